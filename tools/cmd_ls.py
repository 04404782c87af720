"""``blocktool ls``: list samples from the indexes (library: ``dataset_view``)."""

from __future__ import annotations

import sys

import click


@click.command()
@click.argument("path")
@click.option("--limit", "-n", type=int, default=None, help="At most N samples.")
def ls(path, limit):
    """List the samples of the dataset at PATH_OR_URL, one per line: KEY, then each block's
    mode and shape (from the indexes; no payload reads).

    \b
    Example:
      blocktool ls data/shards/mixed -n 5
      # fsdd/0_jackson_0    audio[2327x1] text[4]
    """
    from blocklm.formats import FormatError

    from .dataset_view import ls_lines

    try:
        for line in ls_lines(path, limit):
            click.echo(line)
    except (FormatError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except BrokenPipeError:  # `blocktool ls ... | head`
        sys.stderr.close()

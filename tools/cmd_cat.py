"""``blocktool cat``: write one sample's blocks as ordinary files (library: ``dataset_view``)."""

from __future__ import annotations

import sys

import click


@click.command()
@click.argument("path")
@click.argument("key")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Folder to write the block files into.")
def cat(path, key, out):
    """Write the blocks of sample KEY of the dataset at PATH_OR_URL into OUT as ordinary files,
    OUT/KEY.I.MODE.EXT ('/' in the key becomes '__'): .txt for text, the image's and the
    audio's own format (raw arrays become .png / .wav). Prints the paths written.

    \b
    Example:
      blocktool cat data/shards/mixed fsdd/0_jackson_0 --out /tmp/sample
      # /tmp/sample/fsdd__0_jackson_0.0.audio.wav
      # /tmp/sample/fsdd__0_jackson_0.1.text.txt
    """
    from blocklm.formats import FormatError

    from .dataset_view import find_sample, write_sample

    try:
        for p in write_sample(find_sample(path, key), out):
            click.echo(str(p))
    except KeyError:
        click.echo(f"error: no sample {key!r} in {path}", err=True)
        sys.exit(1)
    except (FormatError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)

"""``blocktool verify``: read and check every payload (library: ``verify_dataset``)."""

from __future__ import annotations

import sys

import click


@click.command()
@click.argument("path")
@click.option("--workers", "-j", type=int, default=None, help="Processes (default: all cores).")
@click.option("--quiet", "-q", is_flag=True, help="Only the problem lines.")
def verify(path, workers, quiet):
    """Read every payload of the dataset at PATH_OR_URL, check every checksum and that each
    payload decodes to its declared shape. Exit 0 if clean; exit 1 with one line per problem:
    SHARD<TAB>KEY<TAB>BLOCK<TAB>REASON.

    \b
    Example:
      blocktool verify data/shards/mixed
      blocktool verify data/shards/images/shard-000000.tar
    """
    import os

    from .verify_dataset import verify_dataset

    res = verify_dataset(path, workers or os.cpu_count() or 1)
    for p in res.problems:
        click.echo(p.line())
    if not quiet:
        click.echo(f"{path}: {res.shards} shards, {res.samples} samples, {res.blocks} blocks, "
                   f"{len(res.problems)} problems", err=True)
    sys.exit(1 if res.problems else 0)

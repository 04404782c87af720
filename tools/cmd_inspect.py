"""``blocktool inspect``: audit a dataset from its manifest and indexes (library:
``inspect_report``, ``html_report``)."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False),
              help="Also write a self-contained HTML page with pictures.")
@click.option("--sample", "key", default=None, help="Show one sample's blocks instead.")
def inspect(path, as_json, html_out, key):
    """Audit the dataset at PATH_OR_URL (folder, manifest.json, one .tar, or a URL) without
    reading payloads: samples, shards, bytes, compression, blocks and codecs per mode, and shape
    distributions per mode (min/median/max, histogram; images as H x W x C).

    \b
    Example:
      blocktool inspect data/shards/mixed
      blocktool inspect data/shards/mixed --json | python -m json.tool
      blocktool inspect data/shards/images --html report.html
      blocktool inspect data/shards/audio --sample fsdd/0_jackson_0
    """
    from blocklm.formats import FormatError

    from .inspect_report import format_summary, summarize

    try:
        if key is not None:
            _show_sample(path, key, as_json)
            return
        summary = summarize(path)
        if html_out:
            from .html_report import render_html

            with open(html_out, "w", encoding="utf-8") as f:
                f.write(render_html(path, summary))
    except (FormatError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))
    if html_out and not as_json:
        click.echo(f"wrote {html_out}", err=True)


def _show_sample(path: str, key: str, as_json: bool) -> None:
    from blocklm.formats import iter_index

    from .dataset_open import opener_for

    for shard, e in iter_index(path, opener=opener_for(path)):
        if e.key == key:
            blocks = [b.header_json() | {"offset": b.offset} for b in e.blocks]
            if as_json:
                click.echo(json.dumps({"key": key, "shard": shard, "blocks": blocks}, indent=1))
                return
            click.echo(f"{key} in {shard} at offset {e.offset} ({e.size} bytes)")
            for j, b in enumerate(e.blocks):
                click.echo(f"  block {j}: {b.mode} {'x'.join(map(str, b.shape))} {b.codec} "
                           f"{b.size} bytes (stored {b.stored}{', zstd' if b.zstd else ''}) "
                           f"meta {json.dumps(b.meta, sort_keys=True)}")
            return
    click.echo(f"error: no sample {key!r} in {path}", err=True)
    sys.exit(1)

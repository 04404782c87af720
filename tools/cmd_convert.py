"""``blocktool convert``: raw files -> block-list shards (library: ``convert_run``)."""

from __future__ import annotations

import sys

import click

from .convert_options import KINDS, TEXT_SPLITS, ConvertOptions


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``500k`` or a plain number of bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 256M") from None
    if n <= 0:
        raise click.BadParameter("the shard size must be positive")
    return n


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder for shards, manifest.json and report.json.")
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="Force the input kind (default: detected per file).")
@click.option("--workers", "-j", type=int, default=None,
              help="Processes converting: this one and N-1 helpers (default: all cores).")
@click.option("--shard-size", default="256M", show_default=True, help="Maximum bytes per shard.")
@click.option("--shard-samples", type=int, default=None, help="Maximum samples per shard.")
@click.option("--text-split", default="paragraphs", show_default=True,
              help=f"How .txt files are cut into samples: {TEXT_SPLITS}.")
@click.option("--text-errors", type=click.Choice(["strict", "replace"]), default="strict",
              show_default=True, help="Non-UTF-8 text: reject it, or decode with U+FFFD.")
@click.option("--text-field", default="text", show_default=True,
              help="The field of a .jsonl text file that holds the text.")
@click.option("--manifest-root", type=click.Path(file_okay=False), default=None,
              help="Sample manifest paths are relative to this folder and may not leave it "
                   "(default: the manifest's own folder).")
@click.option("--prefix", default="shard", show_default=True, help="Shard file name prefix.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same --out.")
@click.option("--strict", is_flag=True, help="Stop at the first bad input (exit 1).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
@click.option("--deep-check", is_flag=True,
              help="Also fully decode every image and audio file. By default PNG, JPEG and WAV "
                   "files get a structural check instead (PNG chunk CRCs, JPEG segments and EOI, "
                   "WAV chunks), which catches truncation and, for PNG, any changed byte; other "
                   "formats are always decoded.")
@click.option("--durable/--no-durable", default=True, show_default=True,
              help="Put every shard, index and journal on disk (fsync) before it gets its final "
                   "name, so that not even a power loss leaves a partial file under a final "
                   "name. --no-durable leaves that to the page cache (faster: no waiting for "
                   "the disk): a killed job (kill -9) still resumes to the same shards, but a "
                   "power loss may leave partial files.")
def convert(inputs, out, kind, workers, shard_size, shard_samples, text_split, text_errors,
            text_field, manifest_root, prefix, resume, strict, quiet, deep_check, durable):
    """Convert folders of images/audio, text, JSONL, sample manifests, WebDataset tars,
    Hugging Face datasets or parquet files into block-list shards.

    Every input is accounted for in OUT/report.json ("inputs", "samples", "rejected"); each
    rejected input is also one line on stderr. Exit 0: nothing rejected; 3: some inputs
    rejected (the rest converted, all shards valid); 1: stopped by --strict; 2: usage error.
    The same inputs and options give byte-identical shards whatever --workers.

    Truncated and corrupt images and audio are rejected: PNG, JPEG and WAV by a structural
    check, other formats by a full decode (--deep-check decodes every file).

    A sample manifest (.jsonl) has one sample per line, e.g.
    [{"mode": "audio", "path": "a.wav"}, {"mode": "text", "text": "seven"}]
    with paths relative to the manifest.

    \b
    Example:
      blocktool convert ../shared/corpora/images/bsd100 --out data/shards/bsd100 --workers 2
      blocktool convert corpus.txt --text-split lines --out data/shards/text --resume
      blocktool convert photos/ --out data/shards/photos --deep-check
    """
    from .convert_run import ConvertError, StrictStop, print_summary, run_convert

    try:
        opts = ConvertOptions(kind=kind, text_split=text_split, text_errors=text_errors,
                              text_field=text_field, manifest_root=manifest_root,
                              workers=workers,
                              shard_size=parse_size(shard_size), shard_samples=shard_samples,
                              prefix=prefix, resume=resume, strict=strict, quiet=quiet,
                              deep_check=deep_check, durable=durable)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        rep = run_convert(list(inputs), out, opts)
    except StrictStop as e:
        click.echo(f"stopped (--strict) at {e.source}: {e.reason}", err=True)
        sys.exit(1)
    except ConvertError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if not quiet:
        print_summary(rep, out)
    sys.exit(3 if rep.rejected else 0)

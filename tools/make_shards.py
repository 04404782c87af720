"""``make shards``: the sample corpora -> ``data/shards/{text,images,audio,mixed,mixed-val}`` and a
sentencepiece tokenizer at ``data/shards/tokenizer.model`` (+ ``.vocab``).

``mixed`` is converted from a generated sample manifest, ``data/shards/mixed.jsonl`` (paths
relative to the corpora folder, ``--manifest-root``): each FSDD clip with the digit it speaks as a
word (audio + text), each image with a caption from its file name (image + text), and consecutive
pairs of tinyshakespeare paragraphs (text + text), interleaved so every shard holds all three.

``mixed-val`` (from ``mixed-val.jsonl``) holds the same kinds of pairs, held out of ``mixed`` for
evaluation: the FSDD recordings with index 0-4 (the dataset's own test split, 10%), every tenth
image, and the last 10% of tinyshakespeare's paragraph pairs (a contiguous slice, as nanoGPT
holds out its last 10%). ``mixed`` and ``mixed-val`` together cover every input once.

Up to date outputs are kept: each output's stamp (the job's fingerprint plus the size and mtime of
every input file) is stored in ``data/shards/make_shards.json`` and compared on the next run.

    python -m blocklm.tools.make_shards --corpora ../shared/corpora --out data/shards
"""

from __future__ import annotations

import json
import sys
import time
from itertools import zip_longest
from pathlib import Path

import click
import xxhash

from .convert_options import ConvertOptions
from .convert_run import fingerprint, run_convert
from .convert_sources import split_text
from .tokenizer_train import TokenizerConfig, train_tokenizer

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STAMPS = "make_shards.json"


def input_signature(paths: list[Path]) -> str:
    """A hash of every file's path, size and mtime under ``paths``."""
    h = xxhash.xxh3_64()
    for root in paths:
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for f in files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def mixed_manifest(corpora: Path, text_split: str = "paragraphs"
                   ) -> tuple[list[dict], list[dict]]:
    """The lines of the mixed sample manifest and of its held-out part (paths relative to
    ``corpora``)."""
    audio = []
    for f in sorted((corpora / "audio/fsdd").glob("*.wav")):
        digit = int(f.name.split("_")[0])
        audio.append({"key": f"fsdd/{f.stem}", "blocks": [
            {"mode": "audio", "path": f.relative_to(corpora).as_posix()},
            {"mode": "text", "text": DIGITS[digit]}]})
    images = []
    for d in sorted(p for p in (corpora / "images").iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            caption = f"{d.name} {f.stem.replace('_', ' ')}"
            images.append({"key": f"{d.name}/{f.stem}", "blocks": [
                {"mode": "image", "path": f.relative_to(corpora).as_posix()},
                {"mode": "text", "text": caption}]})
    texts = []
    for f in sorted((corpora / "text").glob("*.txt")):
        passages = split_text(f.read_text(encoding="utf-8"), text_split)
        for i in range(0, len(passages) - 1, 2):
            texts.append({"key": f"{f.stem}/{i // 2:06d}", "blocks": [
                {"mode": "text", "text": passages[i]}, {"mode": "text", "text": passages[i + 1]}]})
    held = {id(x) for x in audio if int(x["key"].rsplit("_", 1)[1]) < 5}
    held |= {id(x) for x in images[9::10]}
    held |= {id(x) for x in texts[len(texts) - len(texts) // 10:]}
    lines = [x for group in zip_longest(audio, images, texts) for x in group if x is not None]
    return [x for x in lines if id(x) not in held], [x for x in lines if id(x) in held]


def make_shards(corpora: Path, out: Path, workers: int | None, shard_size: int,
                vocab_size: int, log=print) -> int:
    """Build every output that is not up to date; returns the number of rejected inputs."""
    out.mkdir(parents=True, exist_ok=True)
    stamps_path = out / STAMPS
    try:
        stamps = json.loads(stamps_path.read_text())
    except (OSError, ValueError):
        stamps = {}
    train_lines, val_lines = mixed_manifest(corpora)
    manifests = {}
    for name, part in (("mixed", train_lines), ("mixed-val", val_lines)):
        manifest = manifests[name] = out / f"{name}.jsonl"
        data = "".join(json.dumps(x, sort_keys=True) + "\n" for x in part).encode()
        if not manifest.exists() or manifest.read_bytes() != data:
            manifest.write_bytes(data)  # rewritten only when it changes: keeps its mtime stable
    lines = train_lines + val_lines
    as_manifest = {"manifest_root": str(corpora), "kind": "manifest"}
    jobs = {
        "text": ([corpora / "text"], {}),
        "images": (sorted(p for p in (corpora / "images").iterdir() if p.is_dir()), {}),
        "audio": ([corpora / "audio/fsdd"], {}),
        "mixed": ([manifests["mixed"]], as_manifest),
        "mixed-val": ([manifests["mixed-val"]], as_manifest),
    }
    rejected = 0
    for name, (inputs, extra) in jobs.items():
        opts = ConvertOptions(workers=workers, shard_size=shard_size, quiet=True, **extra)
        srcs = [str(p) for p in inputs]
        mixed = name.startswith("mixed")
        deps = inputs + [corpora / p["path"] for x in lines if mixed
                         for p in x["blocks"] if "path" in p]
        stamp = fingerprint(srcs, opts) + ":" + input_signature(deps if mixed else inputs)
        if stamps.get(name) == stamp and (out / name / "report.json").exists():
            log(f"{name}: up to date")
            continue
        t0 = time.perf_counter()
        rep = run_convert(srcs, out / name, opts)
        for r in rep.rejected:
            log(f"{name}: rejected {r['path']}: {r['reason']}")
        rejected += len(rep.rejected)
        log(f"{name}: {rep.samples} samples, {rep.shards} shards, {rep.bytes / 1e6:.1f} MB, "
            f"{len(rep.rejected)} rejected ({time.perf_counter() - t0:.1f} s)")
        stamps[name] = stamp
        stamps_path.write_text(json.dumps(stamps, indent=1, sort_keys=True))
    tok_stamp = f"{vocab_size}:{stamps.get('text')}"
    if stamps.get("tokenizer") != tok_stamp or not (out / "tokenizer.model").exists():
        model, _, n = train_tokenizer([str(out / "text")], out / "tokenizer",
                                      TokenizerConfig(vocab_size=vocab_size))
        log(f"tokenizer: {model} (vocab {vocab_size}, {n} lines)")
        stamps["tokenizer"] = tok_stamp
        stamps_path.write_text(json.dumps(stamps, indent=1, sort_keys=True))
    else:
        log("tokenizer: up to date")
    return rejected


@click.command()
@click.option("--corpora", default="../shared/corpora", show_default=True,
              type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="data/shards", show_default=True, type=click.Path(file_okay=False))
@click.option("--workers", "-j", type=int, default=None, help="Processes (default: all cores).")
@click.option("--shard-size", type=int, default=8 << 20, show_default=True)
@click.option("--vocab-size", type=int, default=4096, show_default=True)
def main(corpora, out, workers, shard_size, vocab_size):
    """Convert the sample corpora into data/shards/{text,images,audio,mixed,mixed-val} and train
    the tokenizer; outputs that are up to date are kept.

    \b
    Example:
      python -m blocklm.tools.make_shards --corpora ../shared/corpora --out data/shards
    """
    t0 = time.perf_counter()
    rejected = make_shards(Path(corpora).resolve(), Path(out), workers, shard_size, vocab_size,
                           log=lambda m: print(m, file=sys.stderr))
    print(f"make shards: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    sys.exit(3 if rejected else 0)


if __name__ == "__main__":
    main()

"""The conversion job: parallel, deterministic, resumable, every input accounted for.

Workers build, validate and encode contiguous chunks of the inputs in parallel
(``convert_parallel``, ``convert_hold``); the parent takes them in input order and places each
sample in the shards (``ShardWriter.span_packed``; a helper then writes its samples there), so
the shards are byte-identical whatever the number of workers. Each finished shard is final (atomic rename); after each one, ``progress.json``
records how many items are done, the shards so far and the rejections so far. ``--resume``
re-enumerates the inputs (cheap), skips the done items and continues writing at the next shard
number, which gives the same bytes as an uninterrupted run. ``report.json`` is written at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from blocklm.formats import ShardInfo, ShardWriter, canonical_json
from blocklm.formats.writer import atomic_write

from .convert_items import Item, Result
from .convert_keys import KeyAllocator
from .convert_options import ConvertOptions
from .convert_parallel import frozen_heap, parallel_results, stale_spill_dirs
from .convert_progress import Progress
from .convert_sources import detect_kind, iter_input

REPORT = "report.json"
JOURNAL = "progress.json"
VERSION = 2  # 2: small payloads compressed at other zstd settings (a v1 run is not resumed)
WINDOW = 4096  # items shared out between the parent and the helpers at a time


class ConvertError(Exception):
    """The job cannot run as asked (e.g. resuming with different options)."""


class StrictStop(Exception):
    """``--strict``: the first bad input stops the job."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


@dataclass
class Report:
    """What ``report.json`` holds: ``inputs == samples + len(rejected)`` once ``complete``."""

    inputs: int = 0
    samples: int = 0
    rejected: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    shards: int = 0
    bytes: int = 0
    payload_bytes: int = 0
    seconds: float = 0.0
    complete: bool = False
    resumed_at: int = 0  # items already done when this run started (resume)
    fingerprint: str = ""
    sources: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def fingerprint(inputs: list[str], opts: ConvertOptions) -> str:
    """Identity of a job: absolute inputs and the options that change the output bytes."""
    ident = {"v": VERSION, "inputs": [os.path.abspath(p) for p in inputs],
             "options": opts.fingerprint_fields()}
    return xxhash.xxh3_64_hexdigest(canonical_json(ident))


def enumerate_items(inputs: list[str], opts: ConvertOptions, skipped: list[str],
                    out: Path | None = None) -> Iterator[Item]:
    """Every item of every input, in order (the same order on every run); the output folder
    ``out`` is never read as input, even when it lies inside one."""
    keys = KeyAllocator()
    exclude = os.path.realpath(out) if out is not None else None
    for path in inputs:
        yield from iter_input(path, opts, keys, skipped, exclude)


def _own_files(out: Path, prefix: str) -> list[Path]:
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)\.(tar|index\.json)(\.tmp)?$")
    return [p for p in out.iterdir() if pat.match(p.name)]


def _shard_number(p: Path) -> int:
    return int(p.name.split("-")[-1].split(".")[0])


def _load_journal(out: Path, fp: str) -> dict | None:
    for name in (REPORT, JOURNAL):
        try:
            state = json.loads((out / name).read_bytes())
        except (OSError, ValueError):
            continue
        if state.get("fingerprint") != fp:
            raise ConvertError(f"cannot resume: {out / name} was written by a job with other "
                               "inputs or options (run without --resume to start over)")
        if name == REPORT and not state.get("complete"):
            continue
        return state | {"_from": name}
    return None


def prepare_out(out: Path, opts: ConvertOptions, fp: str) -> tuple[dict | None, list[ShardInfo]]:
    """Make ``out`` ready: clean (fresh run) or trimmed to the journal's shards (resume)."""
    out.mkdir(parents=True, exist_ok=True)
    state = _load_journal(out, fp) if opts.resume else None
    if state is not None and state["_from"] == REPORT:
        return state, []  # finished: nothing to touch
    previous = [ShardInfo(**s) for s in state["shard_infos"]] if state else []
    for s in previous:
        if not (out / s.shard).is_file() or not (out / s.index).is_file():
            raise ConvertError(f"cannot resume: {out / s.shard} or its index is missing (run "
                               "without --resume to start over)")
    for p in _own_files(out, opts.prefix):
        if p.name.endswith(".tmp") or _shard_number(p) >= len(previous):
            p.unlink()
    for folder in stale_spill_dirs(out, opts.prefix):  # a crashed run's spill files
        shutil.rmtree(folder, ignore_errors=True)
    for name in ("manifest.json", "manifest.json.tmp", f"{JOURNAL}.tmp", f"{REPORT}.tmp"):
        (out / name).unlink(missing_ok=True)
    if state is None:
        for name in (REPORT, JOURNAL):
            (out / name).unlink(missing_ok=True)
    return state, previous


def _write_json(path: Path, obj: dict, durable: bool = True) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8") + b"\n",
                 durable)


def _results(items, n_workers: int, out: Path, opts: ConvertOptions,
             writer: ShardWriter) -> Iterator[Result]:
    """Every item's result in input order (``convert_parallel``: the parent and helpers), in
    windows of ``WINDOW`` items (a source read as a stream is never held whole)."""
    it = iter(items)
    while window := list(itertools.islice(it, WINDOW)):
        yield from parallel_results(window, n_workers, writer, opts.deep_check)


def run_convert(inputs: list[str], out: str | os.PathLike, opts: ConvertOptions) -> Report:
    """Convert ``inputs`` into shards under ``out``; returns (and writes) the report.

    Raises :class:`StrictStop` under ``--strict`` at the first bad input (finished shards stay
    valid; ``report.json`` says where it stopped) and :class:`ConvertError` when it cannot run.
    """
    t0 = time.perf_counter()
    out = Path(out)
    fp = fingerprint(inputs, opts)
    state, previous = prepare_out(out, opts, fp)
    if state is not None and state["_from"] == REPORT:
        return Report(**{k: v for k, v in state.items() if k in Report.__dataclass_fields__})
    rep = Report(fingerprint=fp, sources=[str(p) for p in inputs],
                 options=opts.fingerprint_fields())
    done = state["next_item"] if state else 0
    rep.resumed_at, rep.samples = done, state["samples"] if state else 0
    rep.rejected = list(state["rejected"]) if state else []
    writer = ShardWriter(out, max_bytes=opts.shard_size, max_samples=opts.shard_samples,
                         prefix=opts.prefix, start=len(previous), previous=previous,
                         durable=opts.durable)
    write, span = writer.write_packed, writer.span_packed
    skipped: list[str] = []
    counter = _Counter()
    items = enumerate_items(inputs, opts, skipped, out)
    total = None
    if not any(detect_kind(p, opts.kind) in ("hf", "parquet") for p in inputs):
        items = list(items)  # light items (paths, offsets, short text): gives the bar an ETA
        total = len(items)
    if total is not None:  # a list: the workers can inherit it (see convert_parallel)
        counter.n = total
        done_hash = _skip(iter(items), done)
        items = items[done:]
    else:
        items = counter.count(items)
        done_hash = _skip(items, done)  # identity of the done items: inputs must not have changed
    if state is not None and state.get("done_hash") != done_hash.hexdigest():
        writer.abort()
        raise ConvertError(f"cannot resume: the inputs before item {done} changed since the "
                           "interrupted run (run without --resume to start over)")
    progress = Progress(opts.quiet, done, total)
    with frozen_heap():  # see convert_parallel.frozen_heap
        try:
            results = _results(items, opts.n_workers, out, opts, writer)
            # the per-item path runs ~2,000 times in a sample-corpus run: names bound once
            shards, hash_source = writer.shards, done_hash.update
            update = progress.update if progress.bar is not None else None  # no bar: no call
            samples = rep.samples
            for i, res in enumerate(results, start=done):
                if res.error is not None:
                    rep.rejected.append({"path": res.source, "reason": res.error})
                    progress.reject(res.source, res.error)
                    if opts.strict:
                        raise StrictStop(res.source, res.error)
                else:
                    before = len(shards)
                    if res.spill is not None:
                        span(*res.spill)
                    else:
                        write(*res.encoded)
                    if len(shards) != before:  # a shard was finished: items < i are final
                        _write_json(out / JOURNAL, {
                            "fingerprint": fp, "next_item": i, "done_hash": done_hash.hexdigest(),
                            "samples": samples, "rejected": rep.rejected,
                            "shard_infos": [s.to_json() for s in shards]}, opts.durable)
                    samples += 1
                    rep.samples = samples  # kept current: the report on an error shows it
                    if update is not None:
                        update(res.payload_bytes)
                hash_source(res.source.encode("utf-8", "surrogateescape") + b"\n")
        except BaseException:
            writer.abort()
            progress.close()
            rep.inputs, rep.skipped = counter.n, skipped
            rep.seconds = time.perf_counter() - t0
            _write_json(out / REPORT, rep.to_json(), opts.durable)
            raise
    manifest = writer.close()
    progress.close()
    rep.inputs, rep.skipped, rep.complete = counter.n, skipped, True
    rep.shards, rep.bytes = len(manifest.shards), manifest.bytes
    rep.payload_bytes = sum(m["payload_bytes"] for m in manifest.modes.values())
    rep.seconds = time.perf_counter() - t0
    _write_json(out / REPORT, rep.to_json(), opts.durable)
    (out / JOURNAL).unlink(missing_ok=True)
    return rep


class _Counter:
    """Counts every item enumerated."""

    def __init__(self) -> None:
        self.n = 0

    def count(self, items) -> Iterator[Item]:
        for it in items:
            self.n += 1
            yield it


def _skip(items: Iterator[Item], n: int):
    """Consume the first ``n`` items (done by an earlier run); the running hash of their sources."""
    h = xxhash.xxh3_64()
    for _, it in zip(range(n), items):
        h.update(it.source.encode("utf-8", "surrogateescape") + b"\n")
    return h


def print_summary(rep: Report, out: str) -> None:
    """One line on stderr: samples, rejected, shards, bytes, speed."""
    mb = rep.payload_bytes / 1e6
    print(f"{out}: {rep.samples} samples from {rep.inputs} inputs, {len(rep.rejected)} rejected, "
          f"{rep.shards} shards, {rep.bytes / 1e6:.1f} MB in {rep.seconds:.1f} s "
          f"({mb / max(rep.seconds, 1e-9):.1f} MB/s)", file=sys.stderr)

"""``blocktool bench convert``: conversion speed beside its baselines, in one run.

Rows: a plain read of the files (the I/O ceiling), ``webdataset.ShardWriter`` writing the same
files as samples (no validation), and ``blocktool convert`` (structural check of PNG, JPEG and WAV
files, full decode of the other formats, checksums, index) with 1 worker and with all cores;
``--deep-check`` adds the same two rows with every file fully decoded, ``--no-durable`` the
same two without ``fsync``. MB/s counts input file bytes; each figure is the median of
``--repeat`` rounds, each round running every row once (so a change in the machine's load falls
on all rows alike), after one untimed read that puts the files in the page cache for every row.
The load average before and after is printed with the table. CPU seconds (this process and its
workers) show the work done whatever else loads the machine.

The ShardWriter row runs in a second process (started once, before the rounds, with webdataset
imported there): ``import webdataset`` loads torch (~190 MB), and in this process that made each
fork of convert's helpers cost ~7 ms more CPU than it does in ``blocktool convert``, which never
imports torch. Its figures are measured inside that process, the same way as the others.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

from .convert_items import AUDIO_EXTS, IMAGE_EXTS
from .convert_options import ConvertOptions
from .convert_parallel import join_retired
from .convert_run import run_convert


def bench_files(inputs: list[str]) -> list[Path]:
    """The image and audio files under ``inputs``, sorted."""
    files: list[Path] = []
    for root in inputs:
        p = Path(root)
        cands = sorted(p.rglob("*")) if p.is_dir() else [p]
        files += [f for f in cands if f.is_file()
                  and f.suffix[1:].lower() in IMAGE_EXTS | AUDIO_EXTS]
    return files


def plain_read(files: list[Path], tmp: Path) -> None:
    for f in files:
        with open(f, "rb") as fh:
            fh.read()


def wds_write(files: list[Path], tmp: Path) -> None:
    import webdataset as wds

    with wds.ShardWriter(str(tmp / "wds-%06d.tar"), maxsize=256 << 20, verbose=0) as sink:
        for i, f in enumerate(files):
            sink.write({"__key__": f"{i:08d}", f.suffix[1:].lower(): f.read_bytes()})


def convert_with(workers: int, inputs: list[str], deep_check: bool = False,
                 durable: bool = True):
    def run(files: list[Path], tmp: Path) -> None:
        rep = run_convert(inputs, tmp / "out", ConvertOptions(workers=workers, quiet=True,
                                                              deep_check=deep_check,
                                                              durable=durable))
        if rep.samples != len(files):
            raise click.ClickException(f"converted {rep.samples} of {len(files)} files "
                                       f"({len(rep.rejected)} rejected)")
    return run


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the pool's workers)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _import(name: str) -> None:
    import importlib

    importlib.import_module(name)


class OtherProcess:
    """A row run in a second (spawned) process, so that what it imports stays out of this one."""

    def __init__(self, fn, warm: str) -> None:
        self.fn, self.warm, self.pool = fn, warm, None

    def once(self, files: list[Path]) -> tuple[float, float]:
        if self.pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
            self.pool.submit(_import, self.warm).result()  # not in the timing
        return self.pool.submit(_once, self.fn, files).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


def _once(fn, files: list[Path]) -> tuple[float, float]:
    """Wall and CPU seconds of one run into a fresh temporary folder."""
    if isinstance(fn, OtherProcess):
        return fn.once(files)
    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        c0, t0 = _cpu(), time.perf_counter()
        fn(files, tmp)
        wall = time.perf_counter() - t0
        join_retired()  # convert's helpers exit after it returns: their CPU counts here
        return wall, _cpu() - c0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(rows: list, files: list[Path], repeat: int) -> list[tuple[float, float]]:
    """Median wall and CPU seconds of each row over ``repeat`` rounds. Each round runs every
    row once, so a change in the machine's load (other jobs) falls on all rows alike."""
    times: list[list[float]] = [[] for _ in rows]
    cpus: list[list[float]] = [[] for _ in rows]
    for _ in range(repeat):
        for i, (_, fn) in enumerate(rows):
            wall, cpu = _once(fn, files)
            times[i].append(wall)
            cpus[i].append(cpu)
    return [(statistics.median(t), statistics.median(c)) for t, c in zip(times, cpus)]


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on this platform
        return None


def run_bench(inputs: list[str], repeat: int = 3, workers: int | None = None,
              deep_check: bool = False, no_durable: bool = False) -> dict:
    """All rows of the benchmark as a dict (the ``--json`` output); ``deep_check`` adds the
    ``--deep-check`` rows, ``no_durable`` the ``--no-durable`` ones."""
    files = bench_files(inputs)
    if not files:
        raise click.ClickException(f"no image or audio files under {' '.join(inputs)}")
    nbytes = sum(f.stat().st_size for f in files)
    n = workers or os.cpu_count() or 1
    plain_read(files, Path("."))  # warm the page cache for every row
    rows = [("plain read (I/O ceiling)", plain_read),
            ("webdataset.ShardWriter, 1 process", OtherProcess(wds_write, "webdataset")),
            ("blocktool convert, 1 worker", convert_with(1, inputs)),
            (f"blocktool convert, {n} workers", convert_with(n, inputs))]
    if deep_check:
        rows += [("blocktool convert --deep-check, 1 worker", convert_with(1, inputs, True)),
                 (f"blocktool convert --deep-check, {n} workers", convert_with(n, inputs, True))]
    if no_durable:
        rows += [("blocktool convert --no-durable, 1 worker",
                  convert_with(1, inputs, durable=False)),
                 (f"blocktool convert --no-durable, {n} workers",
                  convert_with(n, inputs, durable=False))]
    out = {"files": len(files), "bytes": nbytes, "cores": os.cpu_count(), "repeat": repeat,
           "load_before": _load(), "rows": []}
    try:
        timings = measure(rows, files, repeat)
    finally:
        for _, fn in rows:
            if isinstance(fn, OtherProcess):
                fn.close()
    for (name, _), (s, cpu) in zip(rows, timings):
        out["rows"].append({"name": name, "seconds": round(s, 3), "cpu_seconds": round(cpu, 3),
                            "mb_per_s": round(nbytes / 1e6 / s, 1),
                            "files_per_s": round(len(files) / s, 1)})
    out["load_after"] = _load()
    base = out["rows"][1]["mb_per_s"]
    for r in out["rows"]:
        r["vs_shardwriter"] = round(r["mb_per_s"] / base, 2)
    return out


def format_table(res: dict) -> str:
    load = ""
    if res.get("load_before") is not None:
        load = f", load average {res['load_before']:.2f} before, {res['load_after']:.2f} after"
    lines = [f"{res['files']} files, {res['bytes'] / 1e6:.1f} MB, {res['cores']} cores, "
             f"median of {res['repeat']} rounds (each round runs every row once){load}", "",
             "| what | seconds | CPU seconds | MB/s | files/s | vs ShardWriter |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
                     f"{r['mb_per_s']:.1f} | {r['files_per_s']:.0f} | "
                     f"{r['vs_shardwriter']:.2f}x |")
    return "\n".join(lines)


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--repeat", "-r", type=int, default=3, show_default=True)
@click.option("--workers", "-j", type=int, default=None, help="The all-cores row (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--deep-check", is_flag=True,
              help="Add rows for `convert --deep-check` (every file fully decoded).")
@click.option("--no-durable", is_flag=True,
              help="Add rows for `convert --no-durable` (no fsync: the page cache writes back).")
def bench_convert(inputs, repeat, workers, as_json, deep_check, no_durable):
    """Convert speed (MB/s, files/s) with 1 and all workers, beside webdataset.ShardWriter
    writing the same files and a plain read of them, all in one run.

    \b
    Example:
      blocktool bench convert ../shared/corpora/images ../shared/corpora/audio --repeat 5
    """
    res = run_bench(list(inputs), repeat, workers, deep_check, no_durable)
    click.echo(json.dumps(res, indent=1) if as_json else format_table(res))
    sys.stdout.flush()

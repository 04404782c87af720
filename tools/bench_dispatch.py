"""``blocktool bench dispatch``: the shape-aware dispatcher against plain FIFO batching per mode.

Both run in the same process over the same examples, token budget, TTL and in-flight limit, with a
no-op runner that only counts; shapes come from the dataset's shard indexes (no payload is read)
or, with ``--synthetic``, from the sample corpora's real shapes (tinyshakespeare passages, FSDD
clip lengths, image sizes). ``requests_per_s`` is the bucketed dispatcher's own overhead: requests
dispatched per second of wall time, best of ``--timing-runs`` runs over the examples repeated to at
least ``--min-requests`` requests (small corpora would otherwise time mostly start-up). The bench
decodes nothing, so by default it runs without the read-ahead thread (``--prefetch 0``), which
here would only add GIL hand-offs; ``requests_per_s_prefetch_thread`` times the same run with the
thread (``DispatchConfig.prefetch=256``), as training uses it to decode ahead;
``requests_per_cpu_s`` divides by the process's CPU time instead of wall time, the steadier figure
on a machine shared with other jobs.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path

import click

DEFAULT_CORPORA = "../shared/corpora"


class _Entry:
    """A shapes-only sample: ``.key`` and ``.blocks`` with ``.mode`` and ``.shape``."""

    __slots__ = ("key", "blocks")

    def __init__(self, key, blocks):
        self.key, self.blocks = key, blocks


class _Shape:
    __slots__ = ("mode", "shape")

    def __init__(self, mode, shape):
        self.mode, self.shape = mode, tuple(shape)


def synthetic_entries(corpora: str | Path = DEFAULT_CORPORA, seed: int = 0) -> list[_Entry]:
    """Shapes-only samples of the sample corpora, in the pairings their README suggests:
    consecutive tinyshakespeare passages (text + text), FSDD clip + the digit it speaks
    (audio ``(frames, 1)`` + text), image ``(H, W, C)`` + its file name (text); shuffled."""
    root = Path(corpora)
    out: list[_Entry] = []
    text = (root / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    passages = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    for i in range(0, len(passages) - 1, 2):
        out.append(_Entry(f"text/{i}", [_Shape("text", (len(passages[i]),)),
                                        _Shape("text", (len(passages[i + 1]),))]))
    import soundfile as sf

    digits = "zero one two three four five six seven eight nine".split()
    for f in sorted((root / "audio" / "fsdd").glob("*.wav")):
        info = sf.info(str(f))
        word = digits[int(f.name.split("_")[0])]
        out.append(_Entry(f"audio/{f.stem}", [_Shape("audio", (info.frames, info.channels)),
                                               _Shape("text", (len(word),))]))
    from PIL import Image

    for f in sorted((root / "images").glob("*/*.png")):
        with Image.open(f) as im:
            w, h = im.size
            c = len(im.getbands())
        out.append(_Entry(f"images/{f.parent.name}/{f.stem}",
                          [_Shape("image", (h, w, c)), _Shape("text", (len(f.name),))]))
    random.Random(seed).shuffle(out)
    return out


def index_entries(path: str) -> list:
    """The samples of a dataset as its index describes them (manifest and shard indexes only)."""
    from blocklm.formats import iter_index

    return [entry for _shard, entry in iter_index(path)]


def run_one(entries, spec, config) -> tuple[dict, float, int, float]:
    """Dispatch ``entries`` with a no-op runner; (metrics, seconds, requests, CPU seconds)."""
    from blocklm.pipeline.dispatch import Dispatcher
    from blocklm.pipeline.dispatch_types import Result

    noop = Result()
    count = [0]

    def runner(batch):
        n = len(batch.requests)
        count[0] += n
        return [noop] * n

    modes = sorted({b.mode for e in entries for b in e.blocks})
    d = Dispatcher({m: runner for m in modes}, spec, config)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in d.run(entries):
        pass
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return d.metrics(), dt, count[0], cpu


def _summary(metrics: dict) -> dict:
    return {m: {"padding_ratio": round(s["padding_ratio"], 5),
                "ttl_forced_fraction": round(s["ttl_forced_fraction"], 5),
                "batches": s["batches"],
                "queue_age_p99": s["queue_age_p99"],
                "batch_fill": round(s["batch_fill"], 4),
                "requests": s["requests"],
                "reasons": s["reasons"]}
            for m, s in metrics["modes"].items() if s["batches"]}


@click.command("bench_dispatch")
@click.argument("source", required=False)
@click.option("--synthetic", is_flag=True,
              help="Use the sample corpora's shapes instead of a dataset (no shards needed).")
@click.option("--corpora", default=DEFAULT_CORPORA, show_default=True,
              help="Corpora folder for --synthetic.")
@click.option("--budget", default=8192, show_default=True, help="Token budget per batch.")
@click.option("--in-flight", "in_flight", default=8192, show_default=True,
              help="Examples in flight (K).")
@click.option("--ttl", default=1024, show_default=True, help="TTL in dispatcher steps.")
@click.option("--repeat", default=4, show_default=True,
              help="Pass over the examples this many times (one long run).")
@click.option("--min-requests", default=100_000, show_default=True,
              help="Requests per timing run.")
@click.option("--timing-runs", default=3, show_default=True, help="Timing runs (best is kept).")
@click.option("--prefetch", default=0, show_default=True,
              help="Read-ahead depth of the main runs (0: no thread).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_dispatch(source, synthetic, corpora, budget, in_flight, ttl, repeat, min_requests,
                   timing_runs, prefetch, as_json):
    """Shape-bucketed dispatcher vs FIFO batching per mode, same budget, no-op runner.

    \b
    Examples:
      blocktool bench dispatch data/shards/mixed --json
      blocktool bench dispatch --synthetic
    """
    from blocklm.pipeline.buckets import BucketSpec, estimate_buckets
    from blocklm.pipeline.dispatch_types import DispatchConfig

    if synthetic == bool(source):
        raise click.UsageError("give a dataset SOURCE or --synthetic (not both)")
    entries = synthetic_entries(corpora) if synthetic else index_entries(source)
    spec = estimate_buckets((b.mode, b.shape) for e in entries for b in e.blocks)
    modes = sorted({b.mode for e in entries for b in e.blocks})
    data = entries * repeat
    config = DispatchConfig(budget=budget, max_in_flight=in_flight, ttl_steps=ttl, decode=False,
                            prefetch=prefetch)
    threaded = DispatchConfig(budget=budget, max_in_flight=in_flight, ttl_steps=ttl, decode=False,
                              prefetch=256)
    bucketed, _, n_run, _ = run_one(data, spec, config)
    fifo, *_ = run_one(data, BucketSpec.fifo(modes), config)
    per_pass = max(1, sum(len(e.blocks) for e in entries))
    timing = entries * max(1, math.ceil(min_requests / per_pass))
    dt = dt_thread = cpu = math.inf
    n = 0
    for _ in range(max(1, timing_runs)):
        _, t, n, c = run_one(timing, spec, config)
        dt, cpu = min(dt, t), min(cpu, c)
        _, t, _, _ = run_one(timing, spec, threaded)
        dt_thread = min(dt_thread, t)
    out = {"bucketed": _summary(bucketed), "fifo": _summary(fifo),
           "requests_per_s": round(n / dt), "requests": n, "seconds": round(dt, 3),
           "requests_per_cpu_s": round(n / cpu),
           "requests_per_s_prefetch_thread": round(n / dt_thread),
           "config": {"budget": budget, "in_flight": in_flight, "ttl_steps": ttl,
                      "prefetch": prefetch,
                      "repeat": repeat, "examples": len(entries), "timing_requests": n,
                      "buckets": {m: len(set(spec.of(m).key(b.shape) for e in entries
                                             for b in e.blocks if b.mode == m)) for m in modes}}}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{len(entries)} examples x {repeat} ({n_run} requests), budget {budget}, "
               f"K {in_flight}, TTL {ttl} steps; dispatcher overhead: {n} requests in "
               f"{dt:.2f} s = {n / dt:,.0f} requests/s (best of {timing_runs}; "
               f"{n / cpu:,.0f} per CPU second; {n / dt_thread:,.0f} with the read-ahead "
               f"thread)")
    click.echo(f"{'mode':8} {'batching':9} {'padding':>8} {'ttl-forced':>10} {'batches':>8} "
               f"{'fill':>6} {'age p99':>8}")
    for name, res in (("bucketed", out["bucketed"]), ("fifo", out["fifo"])):
        for m, s in res.items():
            click.echo(f"{m:8} {name:9} {s['padding_ratio']:8.2%} "
                       f"{s['ttl_forced_fraction']:10.2%} {s['batches']:8d} "
                       f"{s['batch_fill']:6.2f} {s['queue_age_p99']:8.0f}")

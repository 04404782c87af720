"""``blocktool bench train-compare A.json B.json``: two ``bench train`` runs on the same steps.

Runs of one command read the data from the same start, so as long as their batches agree their
steps hold the same work: the same real tokens, step for step. Over those steps the two runs'
times compare without the data's own spread (a 60 s window of gpu_mixed4 varies by a few
percent with where it falls). That is how GPU_NOTES P148-P149 found a machine's first run 5-6%
slower than its second. A change that alters the batches (other batch sizes, other windows)
shares few or no steps: compare whole windows then.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import click

from .bench_machine import describe


def load_run(path: str | Path, row: int = 0) -> dict[str, Any]:
    """Row ``row`` of a ``bench train --out`` file, which must hold per-step figures."""
    p = Path(path)
    try:
        rows = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{p}: not a readable bench train JSON file ({e})") from e
    if not isinstance(rows, list) or not -len(rows) <= row < len(rows):
        raise click.ClickException(f"{p}: has no run {row} (bench train --out writes a list "
                                   f"of runs, one per data and variant)")
    r = rows[row]
    if not isinstance(r, dict) or not r.get("step_ms") or "step_real_tokens" not in r:
        why = r.get("error") if isinstance(r, dict) else None
        raise click.ClickException(f"{p}: run {row} has no per-step figures (step_ms, "
                                   f"step_real_tokens)" + (f"; it failed: {why}" if why else
                                                           "; written by an older bench?"))
    return r


def same_steps(a: dict[str, Any], b: dict[str, Any], top: int = 5) -> dict[str, Any]:
    """The two runs over their leading timed steps with the same real tokens (the same
    batches): how many, each run's real tokens/s over them, B's against A's, the median of B's
    step time minus A's, and the ``top`` steps where they differ most ([step, A ms, B ms],
    1-based within the timed window)."""
    ta, tb = a["step_real_tokens"], b["step_real_tokens"]
    n = 0
    while n < min(len(ta), len(tb)) and ta[n] == tb[n]:
        n += 1
    out: dict[str, Any] = {"steps": n, "steps_a": len(ta), "steps_b": len(tb)}
    if n == 0:
        return out
    ma, mb = a["step_ms"][:n], b["step_ms"][:n]
    real = sum(ta[:n])
    ra, rb = real / (sum(ma) / 1e3), real / (sum(mb) / 1e3)
    diffs = [y - x for x, y in zip(ma, mb)]
    worst = sorted(range(n), key=lambda i: -abs(diffs[i]))[:top]
    out.update(real_tokens_per_s_a=round(ra), real_tokens_per_s_b=round(rb),
               b_over_a=round(rb / ra, 4), median_ms_b_minus_a=round(statistics.median(diffs), 1),
               most_different=[[i + 1, ma[i], mb[i]] for i in sorted(worst)])
    return out


@click.command("train-compare")
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--row", default=0, show_default=True,
              help="Which run of each file (one per data and variant, in order).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench_train_compare(a, b, row, as_json):
    """Compare two `bench train --out` runs over the steps they share (the same batches).

    \b
    Example (a machine's first run against its second, same command):
      blocktool bench train --variants ring --warmup 30 --data data/gpu_mixed4 --out A.json
      blocktool bench train --variants ring --warmup 30 --data data/gpu_mixed4 --out B.json
      blocktool bench train-compare A.json B.json
    """
    ra, rb = load_run(a, row), load_run(b, row)
    res = same_steps(ra, rb)
    # each run's machine (bench_machine.py): runs from different calls ran on different hosts
    res["machine_a"], res["machine_b"] = ra.get("machine"), rb.get("machine")
    res["machine_after_a"], res["machine_after_b"] = ra.get("machine_after"), rb.get("machine_after")
    if as_json:
        click.echo(json.dumps(res))
        return
    for k in ("a", "b"):
        after = res[f"machine_after_{k}"]
        click.echo(f"{k.upper()}: {describe(res[f'machine_{k}'])}"
                   + (f"; after its runs: {describe(after)}" if after else ""))
    if res["steps"] == 0:
        click.echo(f"no shared steps: the runs' first timed steps hold different batches "
                   f"({res['steps_a']} and {res['steps_b']} steps; other data, a shifted start or "
                   f"settings that change the batches). Compare whole windows instead.")
        return
    click.echo(f"{res['steps']} shared steps (of {res['steps_a']} and {res['steps_b']}): real "
               f"tokens/s A {res['real_tokens_per_s_a']:,}, B {res['real_tokens_per_s_b']:,}, "
               f"B/A {res['b_over_a']:.3f}; median step B - A {res['median_ms_b_minus_a']} ms")
    click.echo("steps that differ most (step, A ms, B ms): "
               + ", ".join(f"{s} {x} {y}" for s, x, y in res["most_different"]))


if __name__ == "__main__":
    bench_train_compare()

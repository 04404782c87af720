"""``blocktool bench model``: each part of the model core against the same model without it.

* stack: string reversal (and, under ``stack.dyck2``, Dyck-2) trained at lengths <= train_len,
  tested at train_len+1..test_len, with the processing stack and (baseline, same run) without it;
* banks: associative recall with N memory banks and (baseline) with 1 bank;
* heads: next-mode and shape accuracy on the held-out split of ``data/shards/mixed`` and
  (baseline) the most-frequent-class predictor counted on the training split.

Single-threaded and seeded, so runs are repeatable. ``--quick`` is a reduced version (under a
minute on a 2-core CPU): shorter strings (12 / 30), fewer steps, fewer samples.
"""

from __future__ import annotations

import json
import time

import click

FULL = {"stack": dict(train_len=40, test_len=100, steps=300),
        "dyck2": dict(train_len=40, test_len=100, steps=300),
        "banks": dict(banks=(1, 8), steps=400),
        "heads": dict(steps=150, limit=2000)}
QUICK = {"stack": dict(train_len=12, test_len=30, steps=100),
         "dyck2": dict(train_len=12, test_len=30, steps=150),
         "banks": dict(banks=(1, 8), steps=200),
         "heads": dict(steps=15, limit=300)}


def run(quick: bool, seed: int, data: str, tokenizer: str, parts: tuple[str, ...]) -> dict:
    """All requested sections as one dict (the ``--json`` document)."""
    import torch

    from blocklm.model.bench_heads import run_heads
    from blocklm.model.bench_tasks import run_banks, run_dyck, run_stack

    torch.set_num_threads(1)
    cfg = QUICK if quick else FULL
    out: dict = {"quick": quick, "seed": seed}
    t0 = time.time()
    if "stack" in parts:
        out["stack"] = run_stack(seed=seed, **cfg["stack"])
        out["stack"]["dyck2"] = run_dyck(seed=seed, **cfg["dyck2"])
    if "banks" in parts:
        out["banks"] = run_banks(seed=seed, lr=1e-2, **cfg["banks"])
    if "heads" in parts:
        out["heads"] = run_heads(data, tokenizer, seed=seed, **cfg["heads"])
    out["total_s"] = round(time.time() - t0, 1)
    return out


def table(res: dict) -> str:
    """A plain-text rendering of the results."""
    lines = [f"{'part':<7} {'measure':<34} {'model':>8} {'baseline':>9}"]
    if "stack" in res:
        s = res["stack"]
        what = f"reversal acc, len {s['train_len'] + 1}-{s['test_len']}"
        lines.append(f"{'stack':<7} {what:<34}"
                     f" {s['accuracy_long']:>8.4f} {s['no_stack_accuracy_long']:>9.4f}  (no stack)")
        if "dyck2" in s:
            d = s["dyck2"]
            what = f"dyck-2 acc, len {d['train_len'] + 2}-{d['test_len']}"
            lines.append(f"{'stack':<7} {what:<34} {d['accuracy_long']:>8.4f}"
                         f" {d['no_stack_accuracy_long']:>9.4f}  (no stack)")
    if "banks" in res:
        b = res["banks"]
        n = max(int(k.rsplit("_", 1)[1]) for k in b if k.startswith("accuracy_banks_"))
        what = f"recall acc, {b['pairs']} pairs"
        lines.append(f"{'banks':<7} {what:<34}"
                     f" {b[f'accuracy_banks_{n}']:>8.4f} {b['accuracy_banks_1']:>9.4f}"
                     f"  ({n} banks vs 1)")
    if "heads" in res:
        h = res["heads"]
        if "skipped" in h:
            lines.append(f"{'heads':<7} skipped: {h['skipped']}")
        else:
            for k in ("mode_accuracy", "shape_accuracy"):
                lines.append(f"{'heads':<7} {k.replace('_', ' ') + ' (held out)':<34}"
                             f" {h[k]:>8.4f} {h['baseline'][k]:>9.4f}  (most frequent)")
    return "\n".join(lines)


@click.command("model")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON document.")
@click.option("--quick", is_flag=True, help="Reduced version, under a minute on a 2-core CPU.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every run.")
@click.option("--data", default="data/shards/mixed", show_default=True,
              help="Block-list dataset for the heads section.")
@click.option("--tokenizer", default="data/shards/tokenizer.model", show_default=True,
              help="sentencepiece model of the text mode (heads section).")
@click.option("--only", "parts", multiple=True, type=click.Choice(["stack", "banks", "heads"]),
              help="Run only these sections (repeatable).")
def bench_model(as_json: bool, quick: bool, seed: int, data: str, tokenizer: str,
                parts: tuple[str, ...]) -> None:
    """Show that the stack, the memory banks and the heads earn their place.

    \b
    Example:
      blocktool bench model --quick --json
    """
    res = run(quick, seed, data, tokenizer, parts or ("stack", "banks", "heads"))
    click.echo(json.dumps(res) if as_json else table(res))

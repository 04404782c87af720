"""``blocktool eval RUN --data HELD_OUT``: held-out metrics of a run beside unigram baselines."""

from __future__ import annotations

import json

import click


@click.command(name="eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data", required=True, help="Held-out dataset (folder, manifest, URL).")
@click.option("--samples", default=500, show_default=True, help="Held-out samples to score.")
@click.option("--baseline-samples", default=2000, show_default=True,
              help="Training samples the unigram baseline is fit on.")
@click.option("--key-prefix", default=None,
              help="Score only samples whose key starts with this (e.g. tinyshakespeare/).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_run(run, data, samples, baseline_samples, key_prefix, device, as_json) -> None:
    """Score a trained run on held-out data: bits per element per mode (text: per character),
    next-mode accuracy, shape accuracy, and each mode's unigram baseline.

    \b
    Examples:
      blocktool eval runs/tiny --data data/shards/mixed-val --json
      blocktool eval runs/tiny --data data/shards/mixed-val --key-prefix tinyshakespeare/
    """
    import torch

    from blocklm.formats import iter_dataset
    from blocklm.tools.train.baseline import unigram_bits, unigram_counts
    from blocklm.tools.train.evaluate import evaluate, validation_source
    from blocklm.tools.train.loop import load_model

    def chosen(samples_):
        return (s for s in samples_ if key_prefix is None or s.key.startswith(key_prefix))

    model, cfg, spec = load_model(run, device)
    ev = evaluate(model, chosen(validation_source(data, cfg.train.seed)), samples=samples,
                  config=cfg.dispatch, device=torch.device(device))
    train_counts: dict = {}
    for d in spec.data:
        counts = unigram_counts(model, chosen(iter_dataset(d)), baseline_samples)
        for mode, (c, e) in counts.items():
            prev = train_counts.get(mode)
            train_counts[mode] = (c + prev[0], e + prev[1]) if prev else (c, e)
    held = unigram_counts(model, chosen(iter_dataset(data)), samples)
    ev["unigram"] = unigram_bits(train_counts, held)
    if as_json:
        click.echo(json.dumps(ev, indent=1))
        return
    which = f", keys {key_prefix}*" if key_prefix else ""
    click.echo(f"{run} on {data} ({ev['samples']} samples{which})")
    click.echo("| mode | held-out bits/element | unigram bits/element |")
    click.echo("|---|---:|---:|")
    for mode, v in sorted(ev["loss"].items()):
        click.echo(f"| {mode} | {v:.3f} | {ev['unigram'].get(mode, float('nan')):.3f} |")
    click.echo(f"next-mode accuracy {ev['mode_accuracy']:.3f} (after the first block "
               f"{ev['mode_accuracy_later']:.3f}), shape accuracy "
               f"{ev['shape_accuracy']:.3f}, head bits/prediction {ev['heads_bits']:.3f}")

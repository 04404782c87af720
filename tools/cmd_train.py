"""``blocktool train``: stream shards through the dispatcher into the model."""

from __future__ import annotations

import click


@click.command()
@click.option("--preset", type=click.Choice(["tiny", "small"]), default=None,
              help="Named configuration (a Python function returning the config).")
@click.option("--data", "data", multiple=True,
              help="Dataset: folder, manifest, shard list or brace pattern; local, http(s):// "
                   "or s3://. Repeat for a weighted mixture.")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Mixture weight of each --data, in order.")
@click.option("--out", "run", required=True, type=click.Path(file_okay=False),
              help="Run folder: metrics.jsonl, TensorBoard events, checkpoint.pt.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one config field, e.g. train.lr=1e-3 or model.decoder.layers=4.")
@click.option("--val", default=None,
              help="Held-out dataset evaluated every train.eval_every steps (bits per element, "
                   "next-mode and shape accuracy).")
@click.option("--s3-endpoint", default=None,
              help="Endpoint URL of S3-compatible storage for s3:// data (credentials: the "
                   "usual AWS chain of s3fs/botocore).")
@click.option("--steps", type=int, default=None, help="Stop after this many optimizer steps.")
@click.option("--minutes", type=float, default=None, help="Stop after this many minutes.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(preset, data, weights, run, overrides, val, s3_endpoint, steps, minutes, resume,
          quiet) -> None:
    """Train a block-list model; Ctrl-C or SIGTERM checkpoints and exits.

    \b
    Examples:
      blocktool train --preset tiny --data data/shards/mixed --out runs/tiny --minutes 10
      blocktool train --preset tiny --data data/shards/text --data data/shards/audio \\
          --weight 3 --weight 1 --out runs/mix --steps 500 --set train.lr=1e-3
      blocktool train --out runs/tiny --resume --steps 1000
    """
    from blocklm.tools.train.loop import RunSpec
    from blocklm.tools.train.loop import train as run_training
    from blocklm.tools.train.overrides import OverrideError

    if resume:
        if preset or data or overrides or val or s3_endpoint:
            raise click.UsageError("--resume takes the preset, data and overrides of the run")
        spec = None
    else:
        if not preset or not data:
            raise click.UsageError("a new run needs --preset and at least one --data")
        if weights and len(weights) != len(data):
            raise click.UsageError("give one --weight per --data")
        spec = RunSpec(preset, list(data), list(weights) or None, list(overrides), val,
                       s3_endpoint)
    try:
        summary = run_training(run, spec, steps=steps, minutes=minutes, resume=resume,
                               progress=not quiet)
    except (OverrideError, FileExistsError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"stopped ({summary.get('stopped')}) at step {summary.get('step')}; "
               f"loss {summary.get('loss')}", err=True)

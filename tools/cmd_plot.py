"""``blocktool plot RUN``: a PNG of a run's loss curves per mode."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default: RUN/loss.png).")
def plot(run: str, out: str | None) -> None:
    """Plot the loss per mode (bits per element) from RUN/metrics.jsonl.

    \b
    Example:
      blocktool plot runs/tiny --out runs/tiny/loss.png
    """
    from blocklm.tools.train.metrics import plot_losses

    try:
        path = plot_losses(run, out or Path(run) / "loss.png")
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(path))

"""``blocktool generate RUN --out DIR``: sample whole examples from a trained run."""

from __future__ import annotations

from pathlib import Path

import click

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_EXT = {".wav", ".flac", ".ogg", ".opus", ".mp3"}


def prompt_blocks(prompt: str | None) -> list:
    """A prompt file becomes one block by its extension (text, image, audio); other text is a
    text block."""
    from blocklm.formats import audio_file_block, image_file_block, text_block

    if not prompt:
        return []
    path = Path(prompt)
    if path.is_file():
        ext = path.suffix.lower()
        if ext in IMAGE_EXT:
            return [image_file_block(path.read_bytes())]
        if ext in AUDIO_EXT:
            return [audio_file_block(path.read_bytes())]
        return [text_block(path.read_text(encoding="utf-8"))]
    return [text_block(prompt)]


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the examples: one subfolder each, with .txt/.png/.wav files and "
                   "example.json.")
@click.option("--n", default=4, show_default=True, help="Examples to sample (batched together).")
@click.option("--prompt", default=None,
              help="A text, or a file (.txt, image, audio) every example starts from.")
@click.option("--max-blocks", default=8, show_default=True, help="Blocks per example at most.")
@click.option("--max-block-steps", default=4096, show_default=True,
              help="Predicted shapes costing more decoder steps are scaled down to fit.")
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True, help="0: off.")
@click.option("--top-p", default=1.0, show_default=True, help="1: off.")
@click.option("--adaptive", is_flag=True,
              help="Adaptive temperature ('softmax is not enough').")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def generate(run, out, n, prompt, max_blocks, max_block_steps, temperature, top_k, top_p,
             adaptive, seed, device) -> None:
    """Sample examples: next mode, then its shape, then the block, until the model ends it.

    \b
    Examples:
      blocktool generate runs/tiny --out samples --n 8
      blocktool generate runs/tiny --out samples --prompt "ROMEO:" --temperature 0.8 --top-p 0.9
    """
    import torch

    from blocklm.model.config import SampleConfig
    from blocklm.tools.train.generate import GenerateConfig, write_example
    from blocklm.tools.train.generate import generate as run_generate
    from blocklm.tools.train.loop import load_model

    model, cfg, _ = load_model(run, device)
    gcfg = GenerateConfig(n=n, max_blocks=max_blocks, max_block_steps=max_block_steps, seed=seed,
                          sampling=SampleConfig(temperature, top_k, top_p, adaptive))
    examples = run_generate(model, gcfg, prompt_blocks(prompt), torch.device(device))
    rate = getattr(cfg.model.modes.get("audio"), "sample_rate", 16000)
    for ex in examples:
        folder = write_example(ex, Path(out), rate)
        shapes = ", ".join(f"{b['mode']}{tuple(b['shape'])}" for b in ex["blocks"]) or "(empty)"
        click.echo(f"{folder}: {shapes}")

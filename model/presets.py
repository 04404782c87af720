"""Named model presets (functions returning fresh configs)."""

from __future__ import annotations

from .config import (
    AttentionConfig,
    AudioConfig,
    DecoderConfig,
    HeadsConfig,
    ImageConfig,
    ModelConfig,
    StackConfig,
    TextConfig,
)


def tiny(tokenizer_path: str | None = "data/shards/tokenizer.model",
         vocab_size: int | None = None) -> ModelConfig:
    """A few-thousand-parameter model for CPU tests."""
    dec = DecoderConfig(
        d_model=32, d_core=16, d_ff=64, layers=2,
        attention=AttentionConfig(heads=2, head_dim=8, banks=3, chunk=8),
        stack=StackConfig(depth=12, width=8, hidden=16, max_steps=2),
    )
    return ModelConfig(
        decoder=dec,
        modes={"text": TextConfig(tokenizer_path=tokenizer_path, vocab_size=vocab_size),
               "image": ImageConfig(patch=2, head_width=16),
               "audio": AudioConfig(frame=4, max_channels=2, head_width=16)},
        heads=HeadsConfig(hidden=32, bins=24),
    )


def small(tokenizer_path: str | None = "data/shards/tokenizer.model",
          vocab_size: int | None = 32000) -> ModelConfig:
    """About 125M parameters with a 32k text vocabulary (GPU training)."""
    dec = DecoderConfig(
        d_model=768, d_core=384, d_ff=2048, layers=12,
        attention=AttentionConfig(heads=6, head_dim=64, banks=4, chunk=64),
        stack=StackConfig(depth=256, width=64, hidden=256, max_steps=2),
    )
    return ModelConfig(
        decoder=dec,
        modes={"text": TextConfig(tokenizer_path=tokenizer_path, vocab_size=vocab_size),
               "image": ImageConfig(patch=8, head_width=128),
               "audio": AudioConfig(frame=64, max_channels=2, head_width=128)},
        heads=HeadsConfig(hidden=256, bins=64),
    )

"""Generation: whole examples sampled block by block through the dispatcher.

Each example starts from a prompt (zero or more blocks) or from nothing; after each block the
model predicts the next mode (or the end) and that block's shape, then fills the block. Many
examples run at once: blocks of one mode are batched across examples by the dispatcher, with a
wall-clock time-to-live so a lone request is never held back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blocklm.formats import Block, Sample
from blocklm.model.blocklm import BlockLM
from blocklm.model.config import SampleConfig
from blocklm.model.heads import END
from blocklm.pipeline.cost import cost_from_supports
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_types import Batch, Result, generation_config

GENERATE = "generate"  # codec of a placeholder block: the runner samples its content


@dataclass
class GenerateConfig:
    """How many examples, how long, and how to sample."""

    n: int = 4
    max_blocks: int = 8  # blocks per example, prompt included
    max_block_steps: int = 4096  # a predicted shape costing more decoder steps is scaled down
    sampling: SampleConfig = None  # type: ignore[assignment]
    seed: int = 0
    ttl_seconds: float = 0.05

    def __post_init__(self) -> None:
        if self.sampling is None:
            self.sampling = SampleConfig()


def fit_shape(model: BlockLM, mode: str, shape: tuple[int, ...], max_steps: int
              ) -> tuple[int, ...]:
    """``shape`` scaled down (all dims but a trailing channel dim) until it costs <= max_steps."""
    shape = tuple(max(1, int(d)) for d in shape)
    keep = 1 if len(shape) >= 2 else 0  # channels stay as predicted
    while model.steps(mode, shape) > max_steps and any(d > 1 for d in shape[:len(shape) - keep]):
        shape = tuple(max(1, d * 3 // 4) if i < len(shape) - keep else d
                      for i, d in enumerate(shape))
    return shape


class GenerationRunners:
    """Per-mode runners that run prompt blocks and sample the rest."""

    def __init__(self, model: BlockLM, cfg: GenerateConfig, prompt_blocks: int,
                 device: torch.device) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        self.prompt_blocks = prompt_blocks
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def runner(self, mode: str):
        return lambda batch: self.run(mode, batch)

    @torch.no_grad()
    def run(self, mode: str, batch: Batch) -> list[Result]:
        reqs = batch.requests
        if not reqs:
            return []
        init = self.model.initial_state(1, self.device)[0]
        states = torch.stack([init if r.context is None else r.context for r in reqs])
        out: list[Result | None] = [None] * len(reqs)
        given = [i for i, r in enumerate(reqs) if r.inputs is not None]
        wanted = [i for i, r in enumerate(reqs) if r.inputs is None]
        new = torch.empty_like(states)
        if given:
            res = self.model.run_block(mode, [reqs[i].inputs for i in given], states[given],
                                       targets=False)
            new[given] = res.state
        contents: dict[int, Any] = {}
        if wanted:
            made, st = self.model.generate_block(mode, [reqs[i].shape for i in wanted],
                                                 states[wanted], self.cfg.sampling,
                                                 self.generator)
            new[wanted] = st
            contents = dict(zip(wanted, made))
        nxt = self.model.predict_next(new, self.cfg.sampling, self.generator)
        for i, r in enumerate(reqs):
            follow = None
            if r.block + 1 >= self.prompt_blocks and r.block + 1 < self.cfg.max_blocks:
                m, shape = nxt[i]
                if m != END:
                    follow = (m, fit_shape(self.model, m, shape, self.cfg.max_block_steps))
            out[i] = Result(state=new[i], next=follow, block=contents.get(i))
        return out  # type: ignore[return-value]


def _seed_sample(key: str, prompt: list[Block], first: tuple[str, tuple[int, ...]] | None
                 ) -> Sample:
    blocks = list(prompt)
    if not blocks and first is not None:  # no prompt: the first block is sampled too
        blocks = [Block(first[0], first[1], GENERATE, b"")]
    return Sample(key, blocks)


def generate(model: BlockLM, cfg: GenerateConfig, prompt: list[Block] | None = None,
             device: torch.device | None = None) -> list[dict[str, Any]]:
    """Sample ``cfg.n`` examples; returns per example its key and blocks (mode, shape, content,
    whether it was generated). Examples whose first predicted mode is the end are empty."""
    device = device or next(model.parameters()).device
    prompt = list(prompt or [])
    g = GenerationRunners(model, cfg, max(len(prompt), 1), device)
    firsts = model.predict_next(model.initial_state(cfg.n, device), cfg.sampling, g.generator)
    firsts = [None if m == END else (m, fit_shape(model, m, s, cfg.max_block_steps))
              for m, s in firsts]
    samples = [_seed_sample(f"gen{i:04d}", prompt, firsts[i]) for i in range(cfg.n)]

    def prepare(block: Block) -> tuple[Any, Any]:
        return (None, None) if block.codec == GENERATE else (block.decode(),) * 2

    disp = Dispatcher({m: g.runner(m) for m in model.supports}, None,
                      generation_config(ttl_seconds=cfg.ttl_seconds, max_blocks=cfg.max_blocks,
                                        prefetch=0),
                      cost=cost_from_supports(dict(model.supports)), prepare=prepare)
    finished = {}
    for st in disp.run(s for s in samples if s.blocks):
        for f in st.finished:
            if f.error is not None:
                raise f.error
            finished[f.key] = f
    out = []
    for s in samples:
        blocks = []
        f = finished.get(s.key)
        for b in s.blocks:
            if b.codec != GENERATE:
                blocks.append({"mode": b.mode, "shape": list(b.shape), "content": b.decode(),
                               "generated": False})
        for mode, shape, content in (f.generated if f is not None else []):
            blocks.append({"mode": mode, "shape": list(shape), "content": content,
                           "generated": True})
        out.append({"key": s.key, "blocks": blocks})
    return out


def write_example(example: dict[str, Any], out: Path, sample_rate: int) -> Path:
    """Write an example's blocks as ordinary files plus ``example.json`` (modes and shapes)."""
    import soundfile as sf
    from PIL import Image

    folder = out / example["key"]
    folder.mkdir(parents=True, exist_ok=True)
    listing = []
    for i, b in enumerate(example["blocks"]):
        content = b["content"]
        if b["mode"] == "text":
            name = f"{i:03d}.text.txt"
            (folder / name).write_text(content, encoding="utf-8")
        elif b["mode"] == "image":
            name = f"{i:03d}.image.png"
            arr = np.asarray(content)
            Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(folder / name)
        elif b["mode"] == "audio":
            name = f"{i:03d}.audio.wav"
            sf.write(folder / name, np.asarray(content), sample_rate, subtype="PCM_16")
        else:
            name = f"{i:03d}.{b['mode']}.bin"
            (folder / name).write_bytes(bytes(content))
        listing.append({"file": name, "mode": b["mode"], "shape": b["shape"],
                        "generated": b["generated"]})
    (folder / "example.json").write_text(json.dumps({"key": example["key"], "blocks": listing},
                                                    indent=1) + "\n")
    return folder

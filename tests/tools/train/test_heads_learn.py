"""The next-mode head learns what the block history determines, through the training path.

Toy two-block examples shaped like ``data/shards/mixed``: (audio, text), (image, text) and
(text, text). After the first block the next mode and the end follow from the history alone, so
the head must get those right; only the first block's mode is a guess. The examples run through
the real :class:`Dispatcher` and :class:`ModelRunners` (windows, detached contexts across
windows, end-of-example terms) with the trainer's optimizer and objective.
"""

from __future__ import annotations

import numpy as np
import torch

from blocklm.formats import Sample, pcm_block, raw_image_block, text_block
from blocklm.model.blocklm import BlockLM
from blocklm.model.heads import END
from blocklm.model.presets import tiny
from blocklm.pipeline.cost import cost_from_supports
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_types import DispatchConfig
from blocklm.tools.train.config import tiny as tiny_run
from blocklm.tools.train.evaluate import evaluate
from blocklm.tools.train.loop import make_optimizer
from blocklm.tools.train.runner import Context, ModelRunners

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROSE = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. " * 4


def _examples(n: int, seed: int) -> list[Sample]:
    """Text+text about half the time, audio+text most of the rest, a few image+text."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        word = WORDS[i % 10]
        kind = rng.choice(3, p=[0.5, 0.4, 0.1])
        if kind == 0:
            a = int(rng.integers(0, 150))
            first, second = text_block(PROSE[a:a + 40]), text_block(PROSE[a + 40:a + 70])
        elif kind == 1:
            clip = (rng.standard_normal((int(rng.integers(40, 120)), 1)) * 3000).astype(np.int16)
            first, second = pcm_block(clip, 8000), text_block(word)
        else:
            img = rng.integers(0, 256, (int(rng.integers(4, 9)), 8, 3), dtype=np.uint8)
            first, second = raw_image_block(img), text_block(word)
        out.append(Sample(f"k{i:04d}", [first, second]))
    return out


def _train(model: BlockLM, data: list[Sample], epochs: int, tokens_per_step: int) -> None:
    """The trainer's inner loop (loop.Trainer.fit/optimizer_step) without the files around it."""
    cfg = tiny_run()
    cfg.train.lr = 1e-2
    opt = make_optimizer(model, cfg)
    runners = ModelRunners(model, torch.device("cpu"))
    disp = Dispatcher({m: runners.runner(m) for m in model.supports}, None,
                      DispatchConfig(max_in_flight=32, budget=256, ttl_steps=8, prefetch=0),
                      cost=cost_from_supports(dict(model.supports)))

    def step() -> None:
        objective = runners.window.objective()
        if objective is not None:
            objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        runners.next_window()

    for _ in range(epochs):
        for st in disp.run(iter(data)):
            runners.finish([f.state for f in st.finished
                            if f.error is None and isinstance(f.state, Context)])
            if runners.window.tokens >= tokens_per_step:
                step()
        step()


def test_next_mode_after_the_first_block_is_learned(tokenizer):
    torch.manual_seed(0)
    model = BlockLM(tiny(tokenizer_path=tokenizer))
    _train(model, _examples(96, seed=0), epochs=4, tokens_per_step=300)
    held_out = _examples(60, seed=1)
    ev = evaluate(model, iter(held_out), samples=60, device=torch.device("cpu"),
                  config=DispatchConfig(max_in_flight=32, budget=256, prefetch=0))
    assert ev["samples"] == 60
    assert ev["mode_accuracy_later"] == 1.0, ev
    # the first block is a guess among modes: overall accuracy is below 1 but above 2/3
    assert 2 / 3 < ev["mode_accuracy"] < 1.0, ev
    # the same through generation's entry point, block by block, for each kind of example
    for s in held_out[:12]:
        state = None
        for b in s.blocks:
            state = model.run_block(b.mode, [b.decode()], state, targets=False).state
            if b is s.blocks[0]:
                assert model.predict_next(state)[0][0] == "text", s.key
        assert model.predict_next(state)[0] == (END, None), s.key

"""The trainer's ``prepare`` (run in the dispatcher's read-ahead thread) and the cost shapes it
hands the dispatcher (``train.cost_from_content``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from blocklm.formats import raw_image_block, text_block
from blocklm.model.blocklm import BlockLM
from blocklm.model.presets import tiny
from blocklm.model.text import Tokenized
from blocklm.tools.train.runner import ModelRunners


def test_prepare_gives_a_texts_exact_cost_shape_only_when_asked(tokenizer):
    model = BlockLM(tiny(tokenizer_path=tokenizer))
    sup = model.supports["text"]
    on = ModelRunners(model, torch.device("cpu"), cost_from_content=True)
    off = ModelRunners(model, torch.device("cpu"))
    blk = text_block("Good morrow, cousin; 1234567890 and Ω.")
    got = on.prepare(blk)
    assert len(got) == 3 and isinstance(got[0], Tokenized) and got[0] is got[1]
    assert sup.steps(got[2]) == sup.content_steps(got[0]) != sup.steps(tuple(blk.shape))
    assert len(off.prepare(blk)) == 2  # charged by the block's own shape
    img = on.prepare(raw_image_block(np.zeros((4, 6, 3), np.uint8)))
    assert img[2] is None  # an image's shape is its exact cost already


def test_measured_shape_accuracy_reads_the_blocks_own_shapes(tokenizer):
    """With cost shapes the requests carry them, not the texts' lengths: the shape head's
    accuracy (evaluation) is counted against each text's own shape."""
    model = BlockLM(tiny(tokenizer_path=tokenizer))
    sup = model.supports["text"]
    texts = [sup.prepare(t) for t in ("To be, or not", "Ay", "1234567890 Ω")]
    seen = []
    for flag in (True, False):
        r = ModelRunners(model, torch.device("cpu"), train=False, measure=True,
                         cost_from_content=flag)
        r._accuracy = lambda summary, mode, shapes, cont: seen.append(shapes)
        shape = (lambda t: sup.cost_shape(t)) if flag else (lambda t: sup.shape_of(t))
        reqs = [SimpleNamespace(context=None, shape=shape(t), inputs=t, targets=t, block=0,
                                last=True) for t in texts]
        r.run("text", SimpleNamespace(requests=reqs, padded_cost=30))
    truth = [sup.shape_of(t) for t in texts]
    assert seen == [truth, truth]
    assert [sup.cost_shape(t) for t in texts] != truth  # the two shapes do differ here

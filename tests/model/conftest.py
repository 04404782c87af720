"""Shared fixtures of the model tests: a tiny sentencepiece tokenizer, tiny models, and a look
into autograd graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blocklm.model.blocklm import BlockLM
from blocklm.model.presets import tiny

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "text" / "tinyshakespeare.txt"
FALLBACK = "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n" * 50


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """A byte-fallback BPE model of up to 400 pieces trained on a slice of tinyshakespeare."""
    import sentencepiece as spm

    text = CORPUS.read_text()[:50000] if CORPUS.exists() else FALLBACK
    prefix = tmp_path_factory.mktemp("spm") / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(prefix), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    return str(prefix) + ".model"


@pytest.fixture()
def model(tokenizer_path) -> BlockLM:
    """A tiny BlockLM with all three modes, seeded."""
    torch.manual_seed(0)
    return BlockLM(tiny(tokenizer_path=tokenizer_path))


def _consumers(out: torch.Tensor, leaf: torch.Tensor) -> list[str]:
    """Names of the autograd nodes of ``out``'s graph that hand gradient straight to ``leaf``."""
    found, seen, todo = [], set(), [out.grad_fn]
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        for f, _ in n.next_functions:
            if f is not None and getattr(f, "variable", None) is leaf:
                found.append(type(n).__name__)
            todo.append(f)
    return found


@pytest.fixture()
def grad_consumers():
    """``grad_consumers(out, leaf)``: which backward nodes read ``leaf`` directly (a test that
    a tensor is unpacked by one op, not sliced per consumer)."""
    return _consumers

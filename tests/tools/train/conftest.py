"""Fixtures of the training tests: a small sentencepiece tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPORA = Path(__file__).resolve().parents[4] / "shared" / "corpora"
FALLBACK = "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> str:
    """A 400-piece byte-fallback BPE model trained on a slice of tinyshakespeare."""
    import sentencepiece as spm

    path = CORPORA / "text" / "tinyshakespeare.txt"
    text = path.read_text()[:40000] if path.is_file() else FALLBACK * 400
    prefix = tmp_path_factory.mktemp("spm") / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(prefix), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    return str(prefix) + ".model"

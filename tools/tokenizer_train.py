"""Train a sentencepiece tokenizer on the text blocks of datasets (or on plain text files).

Training input is every line of every ``utf8`` text block, in dataset order; sentencepiece runs
single-threaded on all of it without sampling or shuffling, so the same text gives the same model.
``byte_fallback`` keeps every string encodable (unknown characters become byte pieces).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blocklm.formats import iter_dataset
from blocklm.formats.writer import atomic_write

from .dataset_open import opener_for

MAX_LINE_BYTES = 4000  # sentencepiece skips longer sentences; cut them instead


@dataclass
class TokenizerConfig:
    """sentencepiece options that matter here."""

    vocab_size: int = 4096
    model_type: str = "bpe"  # bpe | unigram | char | word
    character_coverage: float = 1.0
    byte_fallback: bool = True


def iter_text_lines(inputs: list[str], modes: set[str] | None = None) -> Iterator[str]:
    """Non-blank lines of the text blocks of datasets (folders/manifests/.tar) or .txt files."""
    for path in inputs:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield from _cut(f.read())
            continue
        for sample in iter_dataset(path, opener=opener_for(path)):
            for b in sample.blocks:
                if b.codec == "utf8" and (modes is None or b.mode in modes):
                    yield from _cut(b.payload.decode("utf-8"))


def _cut(text: str) -> Iterator[str]:
    for line in text.splitlines():
        line = line.strip()
        while line:
            head = line.encode("utf-8")[:MAX_LINE_BYTES].decode("utf-8", errors="ignore")
            yield head
            line = line[len(head):]


def train_tokenizer(inputs: list[str], out_prefix: str | Path,
                    config: TokenizerConfig | None = None,
                    modes: set[str] | None = None) -> tuple[Path, Path, int]:
    """Train on ``inputs``; writes ``OUT_PREFIX.model`` and ``.vocab``; returns both and the
    number of training lines."""
    import sentencepiece as spm

    cfg = config or TokenizerConfig()
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = list(iter_text_lines(inputs, modes))
    if not lines:
        raise ValueError("no text to train on (no utf8 text blocks or lines found)")
    buf = io.BytesIO()
    # model_writer instead of model_prefix: the output path is then not recorded in the model,
    # so the same text gives the same bytes wherever the model is written
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf,
        vocab_size=cfg.vocab_size, model_type=cfg.model_type,
        character_coverage=cfg.character_coverage, byte_fallback=cfg.byte_fallback,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        minloglevel=2, hard_vocab_limit=False,
    )
    model = out_prefix.with_name(out_prefix.name + ".model")
    vocab = out_prefix.with_name(out_prefix.name + ".vocab")
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    atomic_write(vocab, "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                                for i in range(sp.get_piece_size())).encode("utf-8"))
    atomic_write(model, buf.getvalue())
    return model, vocab, len(lines)

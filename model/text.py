"""Text support: ``str`` contents of shape ``[n_chars]``, sentencepiece tokens, bits per character.

One decoder step per token. The tokenizer is a sentencepiece model file (``make shards`` trains
one at ``data/shards/tokenizer.model``; ``TextConfig.tokenizer_path``). Positions are the token
index from the block start. The loss is summed over tokens and reported per *character* of the
original string, so runs with different tokenizers compare. ``steps(shape)`` is an estimate
(``n_chars / chars_per_token``) since the token count is only known after tokenizing.

Sampling never draws control/unknown pieces and stops once the decoded text has ``n_chars``
characters; the result is cut (or, if the step cap is hit, padded with spaces) to exactly
``n_chars`` so it always has the requested shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .batch import BlockBatch
from .config import SampleConfig, TextConfig
from .sampling import sample_logits
from .support import ModeSupport, step_index


def load_tokenizer(path: str):
    """A sentencepiece processor from a model file."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


@dataclass(frozen=True, slots=True)
class Tokenized:
    """A text content with its token ids, made ahead (:meth:`TextSupport.prepare`, in the
    dispatcher's read-ahead thread) so the batch is built without tokenizing."""

    text: str
    ids: np.ndarray  # int64 [n]


class TextSupport(ModeSupport):
    """Mode support for sentencepiece-tokenized text."""

    name = "text"
    position_dims = 1
    cond_dims = 0
    shape_dims = ("chars",)

    def __init__(self, cfg: TextConfig, d_model: int) -> None:
        super().__init__(d_model)
        self.cfg = cfg
        self._sp = None
        self._banned: list[int] | None = None
        vocab = cfg.vocab_size
        if vocab is None:
            if cfg.tokenizer_path is None:
                raise ValueError("TextConfig needs a tokenizer_path or a vocab_size")
            vocab = self.tokenizer.get_piece_size()
        self.vocab = int(vocab)
        self.emb = nn.Embedding(self.vocab, d_model)
        self.unembed = nn.Linear(d_model, self.vocab)

    @property
    def tokenizer(self):
        """The sentencepiece processor, loaded on first use (its size must fit the vocab)."""
        if self._sp is None:
            sp = load_tokenizer(self.cfg.tokenizer_path)
            if self.cfg.vocab_size is not None and sp.get_piece_size() > self.cfg.vocab_size:
                raise ValueError(f"tokenizer {self.cfg.tokenizer_path} has "
                                 f"{sp.get_piece_size()} pieces > vocab_size {self.cfg.vocab_size}")
            self._sp = sp
        return self._sp

    def prepare(self, content) -> Tokenized:
        """The text with its token ids (:class:`Tokenized`), for :meth:`target` to use as is."""
        self.shape_of(content)
        if isinstance(content, Tokenized):
            return content
        return Tokenized(content, np.asarray(self.tokenizer.encode(content, out_type=int),
                                             dtype=np.int64))

    def shape_of(self, content) -> tuple[int, ...]:
        if isinstance(content, Tokenized):
            return (len(content.text),)
        if not isinstance(content, str):
            raise ValueError(f"text content must be str, got {type(content).__name__}")
        return (len(content),)

    def steps(self, shape: tuple[int, ...]) -> int:
        return math.ceil(shape[0] / self.cfg.chars_per_token) + 1

    def content_steps(self, content) -> int:
        return int(self.encode(content)[0].shape[0]) + 1

    def steps_of(self, contents: list) -> list[int]:
        # texts tokenized ahead counted without a tensor each (bench train counts every batch)
        return [len(c.ids) + 1 if type(c) is Tokenized else self.content_steps(c)
                for c in contents]

    def cost_shape(self, content) -> tuple[int, ...] | None:
        """The character count at which the cost model (:meth:`steps`, ``chars_per_token``)
        gives this text's exact steps, its tokens + 1. A text's characters estimate its tokens
        loosely (characters per token vary by ~20% from text to text on the sample corpora),
        so the trainer's character buckets padded its text grids by ~33% (`bench train
        --simulate`, GPU_NOTES.md, twenty-fourth session); charged and bucketed by this shape
        (``train.cost_from_content``), a batch's padded cost is its grid: 17% padding.
        None where no count maps exactly (``chars_per_token`` under 1)."""
        n = int(self.prepare(content).ids.shape[0])
        s = math.floor(n * self.cfg.chars_per_token)
        for c in (s, s + 1, s - 1):  # float rounding of n * chars_per_token
            if c >= 0 and self.steps((c,)) == n + 1:
                return (c,)
        return None

    def shape_spec(self):
        return [("size", self.cfg.max_chars)]

    def positions_of(self, shape, T: int) -> Tensor:
        return torch.arange(T).float()[:, None]

    def encode(self, content) -> tuple[Tensor, Tensor]:
        ids = torch.from_numpy(self.prepare(content).ids)
        return ids[:, None], torch.ones(len(ids), 1, dtype=torch.bool)

    def encode_flat(self, contents: list) -> tuple[Tensor, Tensor, Tensor]:
        # the ids made ahead (Tokenized) as they are; the other texts by one batch call of the
        # tokenizer (it threads across the batch); one tensor, not two small tensors per block
        for c in contents:
            self.shape_of(c)
        ids: list = [c.ids if isinstance(c, Tokenized) else None for c in contents]
        todo = [i for i, c in enumerate(ids) if c is None]
        if todo:
            for i, t in zip(todo, self.tokenizer.encode([contents[i] for i in todo],
                                                        out_type=int)):
                ids[i] = np.asarray(t, dtype=np.int64)
        n = torch.tensor([len(i) for i in ids], dtype=torch.long)
        vals = torch.from_numpy(np.concatenate(ids) if ids else np.zeros(0, np.int64)).view(-1, 1)
        return vals, torch.ones_like(vals, dtype=torch.bool), n

    def positions_flat(self, shapes: list, n: Tensor) -> Tensor:
        return step_index(n).float()[:, None]  # the token index from each block's start

    def embed_elements(self, inputs: Tensor, cond: Tensor) -> Tensor:
        return self.emb(inputs[..., 0])  # [B,T,d]

    def distribution(self, h: Tensor, batch: BlockBatch | None) -> Tensor:
        return self.unembed(h)[..., None, :]  # [B,T,1,V]

    def sample(self, h: Tensor, shapes: list, t: int, cfg: SampleConfig,
               generator: torch.Generator | None) -> Tensor:
        logits = self.distribution(h, None)[:, 0].float()  # [B,V]
        if self._banned is None:  # control/unknown pieces and ids beyond the tokenizer
            sp = self.tokenizer
            n = sp.get_piece_size()
            self._banned = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
            self._banned += list(range(n, self.vocab))
        if self._banned:
            logits[:, self._banned] = float("-inf")
        return sample_logits(logits, cfg, generator)[:, None]  # [B,1]

    def max_steps(self, shape) -> int:
        return 4 * shape[0]  # a piece covers at least one UTF-8 byte

    def complete(self, elements: Tensor, shape) -> bool:
        if elements.shape[0] >= self.max_steps(shape):
            return True
        return len(self.tokenizer.decode(elements[:, 0].tolist())) >= shape[0]

    def assemble(self, elements: Tensor, shape) -> str:
        text = self.tokenizer.decode(elements[:, 0].tolist())[:shape[0]]
        return text + " " * (shape[0] - len(text))

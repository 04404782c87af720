"""Synthetic tasks that show each part of the decoder earning its place (``blocktool bench model``).

* Stack: string reversal. Input ``x_1..x_n SEP BLANK^(n-1)``, target ``x_n..x_1`` on the SEP and
  BLANK steps (per-token accuracy there). Trained at n <= ``train_len``, tested at
  ``train_len < n <= test_len``; the same decoder without the stack is trained beside it. No
  position features are given, so nothing but the recurrent state can carry the order.
* Stack, second task: Dyck-2. After each bracket, predict the type of the innermost open bracket
  (or "none"): the bracket the next closer must match. Same lengths, same two models.
* Banks: associative recall. Each step carries a (key, value) pair, then query steps carry a key
  and must output its value; N banks against 1 bank at the same size.

All runs are seeded explicitly; nothing reads the environment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .config import AttentionConfig, DecoderConfig, StackConfig
from .decoder import Decoder


class SeqModel(nn.Module):
    """Token embedding -> shared Decoder -> linear readout (no positions)."""

    def __init__(self, vocab_in: int | tuple[int, ...], vocab_out: int, cfg: DecoderConfig
                 ) -> None:
        super().__init__()
        fields = (vocab_in,) if isinstance(vocab_in, int) else tuple(vocab_in)
        self.emb = nn.ModuleList(nn.Embedding(v, cfg.d_model) for v in fields)
        self.dec = Decoder(cfg)
        self.out = nn.Linear(cfg.d_model, vocab_out)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """tokens [B,T] or [B,T,fields] long, mask [B,T] -> logits [B,T,V]."""
        tok = tokens if tokens.dim() == 3 else tokens[..., None]
        x = sum(e(tok[..., i]) for i, e in enumerate(self.emb))  # [B,T,d_model]
        h, _ = self.dec(x, self.dec.initial_state(tokens.shape[0], tokens.device), mask)
        return self.out(h)


@dataclass
class ReversalTask:
    """String reversal over ``symbols`` symbols."""

    symbols: int = 4

    def batch(self, B: int, lo: int, hi: int, g: torch.Generator):
        """tokens, mask (real steps), targets, loss mask — all [B, 2*hi]."""
        n = torch.randint(lo, hi + 1, (B,), generator=g)
        T = 2 * hi
        sep, blank = self.symbols, self.symbols + 1
        tokens = torch.full((B, T), blank, dtype=torch.long)
        targets = torch.zeros(B, T, dtype=torch.long)
        lmask = torch.zeros(B, T, dtype=torch.bool)
        steps = torch.zeros(B, T, dtype=torch.bool)
        for i, k in enumerate(n.tolist()):
            x = torch.randint(0, self.symbols, (k,), generator=g)
            tokens[i, :k], tokens[i, k] = x, sep
            targets[i, k:2 * k] = x.flip(0)
            lmask[i, k:2 * k] = True
            steps[i, :2 * k] = True
        return tokens, steps, targets, lmask


@dataclass
class DyckTask:
    """Dyck-2: after each bracket, predict the type of the innermost open bracket (0, 1) or
    2 when none is open: the bracket the next closer must match."""

    def batch(self, B: int, lo: int, hi: int, g: torch.Generator):
        """tokens (0 '(', 1 '[', 2 ')', 3 ']'), steps, targets, loss mask: [B, hi] (hi even)."""
        tokens = torch.zeros(B, hi, dtype=torch.long)
        targets = torch.zeros(B, hi, dtype=torch.long)
        steps = torch.zeros(B, hi, dtype=torch.bool)
        for i in range(B):
            n = 2 * int(torch.randint(max(1, lo // 2), hi // 2 + 1, (1,), generator=g))
            u = torch.rand(n, generator=g).tolist()
            kinds = torch.randint(0, 2, (n,), generator=g).tolist()
            stack: list[int] = []
            for t in range(n):
                if stack and (len(stack) == n - t or u[t] < 0.5):
                    tokens[i, t] = 2 + stack.pop()
                else:
                    stack.append(kinds[t])
                    tokens[i, t] = kinds[t]
                targets[i, t] = stack[-1] if stack else 2
            steps[i, :n] = True
        return tokens, steps, targets, steps.clone()


def run_dyck(train_len: int, test_len: int, steps: int, seed: int, batch: int = 32,
             lr: float = 3e-3, test_batches: int = 4) -> dict:
    """Dyck-2 with and without the stack; per-token accuracy on lengths train_len+2..test_len."""
    task = DyckTask()
    res = {"task": "dyck2", "train_len": train_len, "test_len": test_len, "steps": steps}
    g = torch.Generator().manual_seed(seed + 1)
    test = [task.batch(batch, train_len + 2, test_len, g) for _ in range(test_batches)]
    for name, enabled in (("", True), ("no_stack_", False)):
        torch.manual_seed(seed)
        m = SeqModel(4, 3, stack_config(train_len + 2, enabled))
        secs = train(m, lambda gg, f: task.batch(batch, 2, curriculum(train_len, f) // 2 * 2, gg),
                     steps, lr, seed)
        big = SeqModel(4, 3, stack_config(test_len + 2, enabled))
        big.load_state_dict(m.state_dict())
        res[f"{name}accuracy_long"] = round(accuracy(big, test), 4)
        res[f"{name}train_s"] = round(secs, 1)
    return res


@dataclass
class RecallTask:
    """Associative recall: ``pairs`` (key, value) steps, then ``queries`` key steps."""

    keys: int = 32
    values: int = 16
    pairs: int = 24
    queries: int = 8

    def batch(self, B: int, g: torch.Generator):
        K, V = self.keys, self.values
        keys = torch.stack([torch.randperm(K, generator=g)[:self.pairs] for _ in range(B)])
        vals = torch.randint(0, V, (B, self.pairs), generator=g)
        q = torch.randint(0, self.pairs, (B, self.queries), generator=g)
        # fields: (key, value) for a pair, (key, V = "query") for a query
        qk = keys.gather(1, q)
        tokens = torch.stack([torch.cat([keys, qk], 1),
                              torch.cat([vals, torch.full_like(qk, V)], 1)], -1)  # [B,T,2]
        targets = torch.cat([torch.zeros_like(vals), vals.gather(1, q)], 1)
        lmask = torch.zeros_like(targets, dtype=torch.bool)
        lmask[:, self.pairs:] = True
        return tokens, torch.ones_like(lmask), targets, lmask


def train(model: SeqModel, sample, steps: int, lr: float, seed: int, clip: float = 1.0
          ) -> float:
    """Adam on masked cross-entropy; ``sample(g, progress in [0, 1))`` -> (tokens, steps,
    targets, lmask)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.time()
    for i in range(steps):
        tok, st, tgt, lm = sample(g, i / steps)
        logits = model(tok, st)
        loss = nn.functional.cross_entropy(logits[lm], tgt[lm])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return time.time() - t0


@torch.no_grad()
def accuracy(model: SeqModel, batches) -> float:
    """Per-token accuracy on the loss-masked positions of the given batches."""
    hit = tot = 0
    for tok, st, tgt, lm in batches:
        pred = model(tok, st).argmax(-1)
        hit += int((pred == tgt)[lm].sum())
        tot += int(lm.sum())
    return hit / max(tot, 1)


def stack_config(depth: int, enabled: bool = True) -> DecoderConfig:
    """The small decoder used by the reversal task."""
    return DecoderConfig(d_model=32, d_core=16, d_ff=64, layers=1,
                         attention=AttentionConfig(heads=2, head_dim=8, banks=2, chunk=32),
                         stack=StackConfig(enabled=enabled, depth=depth, width=16, hidden=32,
                                           max_steps=1))


def curriculum(train_len: int, progress: float) -> int:
    """Longest training string at this point of training: grows from 4 to train_len over the
    first half, then stays at train_len."""
    return min(train_len, 4 + int((train_len - 4) * min(1.0, 2.0 * progress)))


def run_stack(train_len: int, test_len: int, steps: int, seed: int, batch: int = 32,
              lr: float = 3e-3, test_batches: int = 4) -> dict:
    """Reversal with and without the stack; accuracy on lengths train_len+1..test_len.

    The stack depth is a state size, not a parameter: the model trains with room for
    ``train_len`` pushes and is tested, with the same weights, with room for ``test_len``.
    """
    task = ReversalTask()
    res = {"task": "reversal", "train_len": train_len, "test_len": test_len, "steps": steps}
    g = torch.Generator().manual_seed(seed + 1)
    test = [task.batch(batch, train_len + 1, test_len, g) for _ in range(test_batches)]
    short = [task.batch(batch, 1, train_len, g) for _ in range(test_batches)]
    V = task.symbols + 2
    for name, enabled in (("", True), ("no_stack_", False)):
        torch.manual_seed(seed)
        m = SeqModel(V, task.symbols, stack_config(2 * train_len + 2, enabled))
        secs = train(m, lambda gg, f: task.batch(batch, 1, curriculum(train_len, f), gg), steps,
                     lr, seed)
        big = SeqModel(V, task.symbols, stack_config(2 * test_len + 2, enabled))
        big.load_state_dict(m.state_dict())
        res[f"{name}accuracy_short"] = round(accuracy(big, short), 4)
        res[f"{name}accuracy_long"] = round(accuracy(big, test), 4)
        res[f"{name}train_s"] = round(secs, 1)
    return res


def run_banks(banks: tuple[int, ...], steps: int, seed: int, batch: int = 32,
              lr: float = 3e-3) -> dict:
    """Associative recall accuracy with N banks against 1 bank (same widths)."""
    task = RecallTask()
    res: dict = {"task": "recall", "pairs": task.pairs, "queries": task.queries, "steps": steps}
    g = torch.Generator().manual_seed(seed + 1)
    test = [task.batch(batch, g) for _ in range(4)]
    base = DecoderConfig(d_model=64, d_core=32, d_ff=128, layers=1,
                         attention=AttentionConfig(heads=1, head_dim=16, banks=1, chunk=64),
                         stack=StackConfig(enabled=False))
    for n in banks:
        cfg = replace(base, attention=replace(base.attention, banks=n))
        torch.manual_seed(seed)
        m = SeqModel((task.keys, task.values + 1), task.values, cfg)
        secs = train(m, lambda gg, f: task.batch(batch, gg), steps, lr, seed)
        res[f"accuracy_banks_{n}"] = round(accuracy(m, test), 4)
        res[f"train_s_banks_{n}"] = round(secs, 1)
    return res

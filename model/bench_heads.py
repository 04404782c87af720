"""Next-mode and shape heads on a real block-list dataset (``blocktool bench model``, "heads").

A tiny BlockLM is trained on the head losses only (bits of each block's mode and shape, and of
``end`` after the last block) over a hashed 90/10 split of the dataset's samples, then scored on
the held-out 10%: mode accuracy (argmax over modes + end, at every block boundary including the
end) and shape accuracy (every shape entry in the right bin/choice, given the true mode). To keep
this a CPU benchmark each block's *content* is cut to a prefix (text 32 characters, image the
top-left 8x8, audio 64 samples) while the shape targets stay the true shapes. The baseline,
run beside it: the most frequent next mode given the previous block's mode, and the most frequent
shape class given the mode, counted on the training split.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .blocklm import BlockLM
from .heads import END
from .presets import tiny

START = "<start>"


def crop(mode: str, content):
    """The prefix of a block's content the benchmark feeds to the model."""
    if mode == "text":
        return content[:32]
    if mode == "image":
        return np.ascontiguousarray(content[:8, :8])
    if mode == "audio":
        return np.ascontiguousarray(content[:64])
    raise ValueError(f"no crop rule for mode {mode!r}")


def load(path: str, limit: int, modes: set[str]) -> tuple[list, list, int]:
    """(train, held-out) lists of samples as [(mode, shape, cropped content)], split by key,
    and the number of samples left out (empty, or with a mode the model does not register)."""
    from blocklm.formats import iter_dataset

    train, test, left_out = [], [], 0
    for s in iter_dataset(path):
        if not s.blocks or any(b.mode not in modes for b in s.blocks):
            left_out += 1
            continue
        blocks = [(b.mode, tuple(b.shape), crop(b.mode, b.decode())) for b in s.blocks]
        (test if zlib.crc32(s.key.encode()) % 10 == 0 else train).append(blocks)
        if len(train) + len(test) >= limit:
            break
    return train, test, left_out


def run_examples(model: BlockLM, batch: list) -> tuple[torch.Tensor, list, list]:
    """Run a batch of examples block by block (grouped by mode at each position).

    Returns the summed head bits and, per boundary, (example, position, incoming state).
    """
    B = len(batch)
    state = model.initial_state(B)
    total = torch.zeros(())
    boundaries: list[tuple[int, int, torch.Tensor]] = []
    for pos in range(max(len(x) for x in batch)):
        new = state.clone()
        groups: dict[str, list[int]] = {}
        for i, x in enumerate(batch):
            if pos < len(x):
                groups.setdefault(x[pos][0], []).append(i)
                boundaries.append((i, pos, state[i]))
        for mode, idx in groups.items():
            r = model.run_block(mode, [batch[i][pos][2] for i in idx], state[idx])
            # the true shape is the target even though the content was cut
            summary = model.head_input(state[idx])
            shape_bits = model.heads.shape_bits(summary, mode, [batch[i][pos][1] for i in idx])
            total = total + r.loss.mode_bits.sum() + shape_bits.sum()
            new = new.index_copy(0, torch.tensor(idx), r.state)
        state = new
    for i, x in enumerate(batch):
        boundaries.append((i, len(x), state[i]))
    total = total + model.end_bits(state).sum()
    return total, boundaries, [len(x) for x in batch]


@torch.no_grad()
def evaluate(model: BlockLM, data: list, batch: int) -> dict:
    """Mode and shape accuracy of the heads on ``data``."""
    mode_hit = mode_n = shape_hit = shape_n = 0
    for b0 in range(0, len(data), batch):
        chunk = data[b0:b0 + batch]
        _, bounds, _ = run_examples(model, chunk)
        for i, pos, st in bounds:
            truth = chunk[i][pos][0] if pos < len(chunk[i]) else END
            pred = model.modes[int(model.heads.mode_logits(model.head_input(st[None])).argmax())]
            mode_hit += pred == truth
            mode_n += 1
            if truth != END:
                head = model.heads.shape[truth]
                ctx = model.heads.trunk(model.head_input(st[None]))
                _, cls = head.predict(ctx, None, None)
                true_cls = head.classes(torch.tensor([chunk[i][pos][1]]))
                shape_hit += bool((cls == true_cls).all())
                shape_n += 1
    return {"mode_accuracy": round(mode_hit / max(mode_n, 1), 4),
            "shape_accuracy": round(shape_hit / max(shape_n, 1), 4)}


def baseline(model: BlockLM, train: list, test: list) -> dict:
    """Most frequent next mode given the previous mode; most frequent shape class per mode."""
    nxt: dict[str, Counter] = {}
    shp: dict[str, Counter] = {}
    for x in train:
        seq = [START] + [m for m, _, _ in x] + [END]
        for a, b in zip(seq, seq[1:]):
            nxt.setdefault(a, Counter())[b] += 1
        for m, s, _ in x:
            cls = tuple(model.heads.shape[m].classes(torch.tensor([s]))[0].tolist())
            shp.setdefault(m, Counter())[cls] += 1
    mh = mn = sh = sn = 0
    for x in test:
        seq = [START] + [m for m, _, _ in x] + [END]
        for a, b in zip(seq, seq[1:]):
            mh += a in nxt and nxt[a].most_common(1)[0][0] == b
            mn += 1
        for m, s, _ in x:
            cls = tuple(model.heads.shape[m].classes(torch.tensor([s]))[0].tolist())
            sh += m in shp and shp[m].most_common(1)[0][0] == cls
            sn += 1
    return {"mode_accuracy": round(mh / max(mn, 1), 4), "shape_accuracy": round(sh / max(sn, 1), 4)}


def run_heads(path: str, tokenizer: str, steps: int, seed: int, batch: int = 16,
              limit: int = 2000) -> dict:
    """Train the heads of a tiny BlockLM on ``path`` and score them on the held-out split."""
    if not Path(path).exists():
        return {"skipped": f"no {path}: run make shards"}
    torch.manual_seed(seed)
    model = BlockLM(tiny(tokenizer_path=tokenizer))
    train, test, left_out = load(path, limit, set(model.supports))
    if not train or not test:
        return {"skipped": f"{path} has too few samples of the registered modes"}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for _ in range(steps):
        pick = [train[i] for i in rng.integers(0, len(train), batch)]
        bits, _, _ = run_examples(model, pick)
        opt.zero_grad()
        (bits / batch).backward()
        opt.step()
    res = {"dataset": path, "train_samples": len(train), "test_samples": len(test),
           "left_out_samples": left_out, "steps": steps, "train_s": round(time.time() - t0, 1)}
    res.update(evaluate(model, test, 64))
    res["baseline"] = baseline(model, train, test)
    return res

"""The in-flight states are detached and compacted at each window's close (state_groups.py): a
row held by one straggler must not pin its whole batch's storage (the H200's mixed run went out
of memory that way), and nothing the model computes changes."""

from __future__ import annotations

import gc

import torch

from blocklm.tools.train.runner import Context
from blocklm.tools.train.state_groups import StateGroups

from .test_chain import _spec, dataset  # noqa: F401  (the fixture)


def _batch(rows: int, width: int = 16) -> tuple[list[Context], torch.Tensor]:
    x = torch.randn(rows, width, requires_grad=True)
    new = x * 2  # a graph behind the rows, as a runner's states have
    heads = new[:, :4]
    return [Context(row, 0, (heads, i)) for i, row in enumerate(new.unbind(0))], new


def test_stragglers_are_copied_out_of_their_batch_storage():
    groups = StateGroups()
    ctxs, new = _batch(8)
    groups.add(ctxs, 8)
    keep = [ctxs[1], ctxs[6]]
    want = [c.state.detach().clone() for c in keep]
    del ctxs
    gc.collect()
    groups.close()
    for c, w in zip(keep, want):
        assert c.state.grad_fn is None and c.head is None and torch.equal(c.state, w)
        assert c.state.untyped_storage().nbytes() == 2 * 16 * 4  # two rows, not eight
    del keep, c
    gc.collect()
    groups.close()
    assert len(groups) == 0  # every context gone: the group too


def test_a_mostly_live_batch_is_detached_in_place_then_compacted_when_it_thins():
    groups = StateGroups()
    ctxs, new = _batch(8)
    groups.add(ctxs, 8)
    ptr = new.untyped_storage().data_ptr()
    del ctxs[5:]  # 5 of 8 live: no copy
    gc.collect()
    groups.close()
    assert all(c.state.grad_fn is None and c.head is None for c in ctxs)
    assert {c.state.untyped_storage().data_ptr() for c in ctxs} == {ptr}
    del ctxs[1:]  # 1 of 8: copied out at the next close
    gc.collect()
    groups.close()
    assert ctxs[0].state.untyped_storage().data_ptr() != ptr
    assert ctxs[0].state.untyped_storage().nbytes() == 16 * 4


def test_a_chained_run_with_compaction_trains_exactly_as_without(tmp_path, dataset,  # noqa: F811
                                                                 tokenizer, monkeypatch):
    """Losses and parameters bitwise equal with the compaction and with it switched off; and
    at the end no held state pins more than twice the rows it shares its storage with."""
    from blocklm.tools.train.loop import Trainer

    out = {}
    for on in (True, False):
        if not on:
            monkeypatch.setattr(StateGroups, "close", lambda self: None)
        tr = Trainer(tmp_path / str(on), _spec(dataset, tokenizer), resume=False, remote=None,
                     progress=False, tensorboard=False)
        losses, seen = [], []  # per step: (held states, the worst storage / live rows)
        opt = tr.optimizer_step

        def step(opt=opt, tr=tr, losses=losses, seen=seen):
            opt()  # the window closes in it
            losses.append(tr.summary.get("loss"))
            held = [ex.state.state for ex in tr.disp._in_flight.values()
                    if isinstance(ex.state, Context) and ex.state.state is not None]
            by_storage: dict[int, list] = {}
            for s in held:
                by_storage.setdefault(s.untyped_storage().data_ptr(), []).append(s)
            seen.append((len(held), max((v[0].untyped_storage().nbytes() /
                                         (len(v) * v[0].nbytes)
                                         for v in by_storage.values()), default=1.0)))
        tr.optimizer_step = step
        tr.fit(steps=8, minutes=None)
        out[on] = (losses, {k: v.clone() for k, v in tr.model.state_dict().items()},
                   max(w for _, w in seen), sum(n for n, _ in seen))
    (la, pa, wa, na), (lb, pb, wb, _) = out[True], out[False]
    assert la == lb and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert na > 0 and wa <= 2.0 < wb  # without it a straggler pinned its batch's storage

"""``bench train --simulate``: the trainer's dispatcher on the CPU with no-op runners (batches,
sequential decoder steps and padding per optimizer step), as the trainer runs it."""

from __future__ import annotations

from collections import Counter, defaultdict


def simulate_dispatch(preset: str, data: str, extra: list[str], epochs: int = 1,
                      trace: list | None = None) -> dict:
    """``epochs`` epochs of ``data`` through the preset's dispatcher as the trainer runs them,
    with no-op runners (CPU, no model calls): batches and sequential decoder steps (the stack's
    recurrence: each batch runs its padded length step by step) per ``tokens_per_step``, and the
    padding share; per mode: batches, padded tokens per batch, padding and why the batches ran
    (``full``, ``ttl``, ``drain``...). Epochs are reshuffled by the loader's ``set_epoch`` as in
    the trainer. With ``train.chain_epochs`` (the default) they are ONE endless dispatcher run
    (:mod:`blocklm.tools.train.chain`), and its steady state is counted: the batches run while
    ``epochs`` whole epochs are admitted, from the first epoch start after ``2 x max_in_flight``
    samples were drawn (a long run has no final drain, and its start-up admission of K examples
    at once is not typical); with ``train.chain_epochs=false`` one run per epoch, each drained,
    from the first. Windows close where the trainer's do: at ``tokens_per_step`` padded tokens,
    or once their batches hold ``train.window_max_state_gib`` of states (each batch's
    ``[B, state_size]`` in and out, as the trainer's runner counts them). ``trace`` gets every
    batch's (mode, request keys)."""
    from blocklm.model.blocklm import BlockLM
    from blocklm.pipeline import RemoteConfig
    from blocklm.pipeline.cost import cost_from_supports
    from blocklm.pipeline.dispatch import Dispatcher
    from blocklm.pipeline.dispatch_types import Result
    from blocklm.tools.train.chain import EpochChain, training_dispatch
    from blocklm.tools.train.config import build_config
    from blocklm.tools.train.loop import RunSpec, make_buckets, make_source
    from blocklm.tools.train.loop_util import window_limited, window_rooms

    cfg = build_config(preset, extra)
    cfg.dispatch.decode = False  # the runners never look at the contents
    chained = cfg.train.chain_epochs
    model = BlockLM(cfg.model)
    supports = dict(model.supports)
    cost = cost_from_supports(supports)
    # the modes whose shapes only estimate their steps (text) are decoded and measured: the
    # padding and sequential steps are counted on their exact steps either way, and with
    # train.cost_from_content the dispatcher charges them so, as the trainer's does
    measured = {m for m, sup in supports.items() if sup.cost_estimated}

    def prepare(block):
        if block.mode not in measured:
            return None, None
        sup = supports[block.mode]
        content = sup.prepare(block.decode())
        exact = sup.content_steps(content)
        return exact, exact, sup.cost_shape(content) if cfg.train.cost_from_content else None
    n: dict[str, float] = defaultdict(float)
    per: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    reasons: dict[str, Counter] = defaultdict(Counter)  # mode -> why its batches ran

    counting = [not chained]  # chained: only the steady-state window (docstring)
    # the optimizer step's window so far (the trainer's): padded tokens, bytes of state held
    window = [0, 0]
    windows: list[int] = []  # each counted window's padded tokens (train.window_max)
    by_states = [0]  # counted windows closed by train.window_max_state_gib before their tokens
    row_bytes = model.state_size * 4  # an example's fp32 state

    def runner(batch):
        window[0] += batch.padded_cost
        reqs = batch.requests
        # the runner's [B, state_size] states in (an example continues) and out (one goes on)
        holds = any(r.context is not None for r in reqs) + (not all(r.last for r in reqs))
        window[1] += holds * len(reqs) * row_bytes
        if trace is not None and batch.requests:
            trace.append((batch.mode, [r.key for r in batch.requests]))
        if batch.requests and counting[0]:
            # each block's exact steps (measured modes' prepare put them in the targets): the
            # model's grid is the batch's longest block times its size
            exact = [r.targets if r.targets is not None else r.cost for r in reqs]
            seq = max(exact)
            for d in (n, per[batch.mode]):
                d["batches"] += 1
                d["padded"] += batch.padded_cost
                d["real"] += batch.cost
                d["seq_steps"] += seq
                d["grid"] += seq * len(reqs)
                d["exact"] += sum(exact)
            reasons[batch.mode][batch.reason] += 1
        return [Result(state=True) for _ in reqs]  # a context for the example's next block

    remote = RemoteConfig()
    buckets = make_buckets([data], cost, remote, cfg.train.bucket_max_width)
    disp = Dispatcher({m: runner for m in supports}, buckets, training_dispatch(cfg), cost=cost,
                      prepare=prepare)
    source = make_source(RunSpec(preset, [data]), cfg, remote)
    t = cfg.train
    room, mode_rooms = window_rooms(t)
    cap = None if t.window_max_state_gib is None else t.window_max_state_gib * 2**30

    def limited(run):
        for st in window_limited(run, disp, room, lambda: window[0], mode_rooms):
            yield st
            over = cap is not None and window[1] >= cap
            if window[0] >= t.tokens_per_step or over:  # the trainer's optimizer step
                if counting[0]:
                    windows.append(window[0])
                    by_states[0] += window[0] < t.tokens_per_step
                window[:] = [0, 0]

    if chained:
        chain = EpochChain(source, 0, 0, name=data)
        steps, first = limited(disp.run(chain)), None
        for _ in steps:
            if first is None and disp.drawn >= 2 * cfg.dispatch.max_in_flight:
                first = chain.epoch_of(disp.drawn - 1) + 1  # past the start-up's admissions
            begin = None if first is None else chain.start(first)
            counting[0] = begin is not None and disp.drawn >= begin
            end = None if first is None else chain.start(first + epochs)
            if end is not None and disp.drawn >= end:
                break
        steps.close()
    else:
        for e in range(epochs):
            source.set_epoch(e)
            for _ in limited(disp.run(source)):
                pass
            window[:] = [0, 0]  # the epoch's partial window
    scale = cfg.train.tokens_per_step / max(n["padded"], 1.0)
    modes = {m: {"batches": int(v["batches"]),
                 "tokens_per_batch": round(v["padded"] / v["batches"]),
                 "padding": round(1 - v["real"] / v["padded"], 3),
                 "grid_padding": round(1 - v["exact"] / v["grid"], 3),
                 "exact_steps_per_batch": round(v["exact"] / v["batches"]),
                 "reasons": dict(sorted(reasons[m].items()))}
             for m, v in sorted(per.items())}
    return {"data": data, "bucket_max_width": cfg.train.bucket_max_width, "epochs": epochs,
            "chain_epochs": chained, "cost_from_content": cfg.train.cost_from_content,
            "batches_per_step": round(n["batches"] * scale, 2),
            "sequential_steps_per_step": round(n["seq_steps"] * scale),
            "padding": round(1 - n["real"] / max(n["padded"], 1.0), 3),
            # the model's: its [B, T] grids against the blocks' exact steps
            "grid_padding": round(1 - n["exact"] / max(n["grid"], 1.0), 3),
            "exact_steps_per_step": round(n["exact"] * scale),
            "batches_per_epoch": round(n["batches"] / epochs, 1),
            # full windows' padded tokens (their activations live until the window's backward)
            "window_tokens": {"max": max(windows, default=0),
                              "mean": round(sum(windows) / max(len(windows), 1))},
            # windows closed by their states before their tokens (train.window_max_state_gib)
            "windows_closed_by_states": by_states[0], "windows": len(windows),
            "modes": modes}

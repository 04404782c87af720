"""Cost of one sequential stack step on the GPU: eager loop, CUDA graphs, fused kernels, one kernel
per ponder iteration (``-ctrl``), the same with the cells as a ring (``-ring``).

``python -m blocklm.model.stack_timing [--json out.json]``: the `small` preset's stack (K=256,
W=64, Hd=256, 2 ponder iterations, d_model 768) over blocks of B examples x T steps under bf16
autocast, forward + backward, side by side in one process; prints ms per sequential step (wall
time over T, after a synchronize), the graphs' first call (capture) and peak memory; a table last.
``--rows`` (CPU or GPU, no timing): how many of the K rows each pass of the ring kernels
(``StackConfig.ring``) loads on the same inputs, against K for the shifting kernels.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from . import stack_ctrl
from .config import StackConfig
from .stack import ProcessingStack
from .stack_block import stack_block

SHAPES = ((11, 240), (64, 128), (300, 96))  # an image batch, a mid batch, a text batch


def _once(st, x, V, s, mask) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, V2, s2 = stack_block(st, x, V, s, mask)
    loss = y.float().square().mean() + V2.mean() + s2.mean()
    loss.backward()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(variant: str, B: int, T: int, reps: int) -> dict:
    """One (variant, shape): 'eager', 'fused' (eager loop, fused kernels), 'graphs-U' (U steps
    a graph), 'graphs-U-fused' or 'graphs-U-ctrl' (one kernel per ponder iteration,
    stack_ctrl.py), 'graphs-U-ring' (ctrl with ``StackConfig.ring``; ':ACTIVE=0' loads every
    row), 'graphs-U-persist' (ring, a chunk's iterations in one launch: stack_chunk.py)."""
    torch.manual_seed(0)
    variant, _, opts = variant.partition(":")  # 'graphs-8-ctrl:G=2+IC=16': launch options
    stack_ctrl.OVERRIDE.clear()
    stack_ctrl.OVERRIDE.update((k, int(v)) for k, v in
                               (kv.split("=") for kv in opts.split("+") if kv))
    graphs = variant.startswith("graphs")
    cfg = StackConfig(depth=256, width=64, hidden=256, max_steps=2, graphs=graphs,
                      graph_unroll=int(variant.split("-")[1]) if graphs else 8,
                      fused=variant.endswith("fused"),
                      fused_ctrl=variant.endswith(("ctrl", "ring", "persist")),
                      ring=variant.endswith(("ring", "persist")),
                      persistent=variant.endswith("persist"))
    st = ProcessingStack(cfg, 768).cuda()
    x = torch.randn(B, T, 768, device="cuda", requires_grad=True)
    V = torch.randn(B, 256, 64, device="cuda").requires_grad_(True)
    s = (torch.rand(B, 256, device="cuda") * 0.05).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    first = _once(st, x, V, s, mask)  # graphs: capture; eager: allocator warm-up
    times = sorted(_once(st, x, V, s, mask) for _ in range(reps))
    med = times[len(times) // 2]
    stack_ctrl.OVERRIDE.clear()
    return {"variant": variant + (":" + opts if opts else ""), "B": B, "T": T, "first_s": round(first, 3),
            "ms_per_step": round(med / T * 1e3, 3), "block_s": round(med, 4),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def ring_rows(B: int, T: int) -> dict:
    """Mean rows per example and iteration that the ring kernels' passes touch on
    :func:`measure`'s inputs (eager reference loop, fp32): read (s > 0 above one unit), pop
    (popped), the backward's d/d popped (pop reaches or empty) and d/d read-weight passes, and
    the rows whose gradient changes. The shifting kernels touch all K in each."""
    from .stack import mass_above, stack_pop, stack_push, stack_read
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    st = ProcessingStack(StackConfig(depth=256, width=64, hidden=256, max_steps=2), 768).to(dev)
    x = torch.randn(B, T, 768, device=dev)
    V = torch.randn(B, 256, 64, device=dev)
    s = torch.rand(B, 256, device=dev) * 0.05
    n = {k: 0.0 for k in ("read", "pop", "d_popped", "d_weights", "grad_rows")}
    with torch.no_grad():
        for t in range(T):
            e, left, run = st.embed(x[:, t]), s.new_zeros(B), s.new_ones(B)
            for _ in range(st.cfg.max_steps):
                above = mass_above(s)
                wt = torch.minimum(s, (1 - above).clamp(min=0))
                e = torch.tanh(st.ctrl(torch.cat([e, stack_read(V, s, above)], -1)))
                p = st.act(e).softmax(-1)
                pop = torch.minimum(p[:, 1] * run, 1 - left)
                s2, popped = stack_pop(s, pop, above)
                gone = (pop[:, None] - above > 0) | (s <= 0)
                for k, m in (("read", wt > 0), ("pop", popped != 0), ("d_popped", gone),
                             ("d_weights", (above < 1) | (s <= 0)),
                             ("grad_rows", (popped != 0) | (wt != 0))):
                    n[k] += float(m.float().sum(1).mean()) / (T * st.cfg.max_steps)
                left = left + popped.sum(-1)
                V, s, _ = stack_push(V, s2, torch.tanh(st.val(e)), p[:, 0] * run)
                run = run * (left < 1 - st.cfg.epsilon).float()
    return {"B": B, "T": T, "K": 256, **{k: round(v, 1) for k, v in n.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="eager,graphs-8-fused,graphs-8-ctrl,graphs-16-ctrl")
    ap.add_argument("--rows", action="store_true", help="rows the ring kernels touch, no timing")
    ap.add_argument("--shapes", default=None,
                    help="B x T blocks to time, e.g. 40x3080,144x545 (a text epoch's longest "
                         "buckets); default: " + ",".join(f"{b}x{t}" for b, t in SHAPES))
    a = ap.parse_args()
    shapes = SHAPES if a.shapes is None else tuple(
        tuple(int(n) for n in bt.split("x")) for bt in a.shapes.split(","))
    if a.rows:
        for B, T in SHAPES:
            print(json.dumps(ring_rows(min(B, 64), T)), flush=True)
        return
    rows = []
    for B, T in shapes:
        for v in a.variants.split(","):
            try:
                r = measure(v, B, T, a.reps if v not in ("eager", "fused") else 1)
            except Exception as e:  # one failing variant must not lose the others' figures
                r = {"variant": v, "B": B, "T": T, "error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'B':>4} {'T':>4} {'variant':<10} {'ms/step':>8} {'x eager':>8} {'first s':>8} "
          f"{'peak GiB':>8}")
    for B, T in shapes:
        base = next((r["ms_per_step"] for r in rows
                     if (r["B"], r["T"]) == (B, T) and r["variant"] == "eager"
                     and "error" not in r), None)
        for r in rows:
            if (r["B"], r["T"]) != (B, T):
                continue
            if "error" in r:
                print(f"{B:>4} {T:>4} {r['variant']:<10} {r['error'][:60]}")
                continue
            sp = f"{base / r['ms_per_step']:.1f}" if base else "-"
            print(f"{B:>4} {T:>4} {r['variant']:<10} {r['ms_per_step']:>8} {sp:>8} "
                  f"{r['first_s']:>8} {r['peak_gib']:>8}")


if __name__ == "__main__":
    main()

"""``blocktool bench gpu``: banked-attention kernels against SDPA and the PyTorch reference.

Forward + backward of one attention call, bf16 q, k, v [B,H,T,D] (r, w, g in fp32 as the decoder
produces them), at B=4, H=16, D=128 by default; median of CUDA-event timings after warm-up.
Baselines in the same run: SDPA causal (``F.scaled_dot_product_attention``) and the plain PyTorch
chunked reference (:func:`blocklm.model.banked_triton.banked_attention_reference`, skipped above
``--ref-max-tokens``), plus a bf16 matmul's TFLOP/s as the machine's ceiling.
"""

from __future__ import annotations

import importlib
import json
import statistics

import click


def _median_ms(fn, reps: int, warmup: int = 3, budget_ms: float = 3000.0) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    total = 0.0
    while len(times) < reps and (total < budget_ms or len(times) < 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        total += times[-1]
    return statistics.median(times)


def _queued_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median ms per call with the calls queued back to back (one sync at the end): the GPU's
    time per call when the host runs ahead, as in a training step. _median_ms waits for each
    call, so it also counts the host's time to the first launch (~0.1-0.2 ms for the banked
    call's Python, GPU_NOTES "Lead, 2026-11-23 15:50")."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """bf16 n x n x n product through torch, random operands."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b, reps)
    return 2 * n**3 / ms / 1e9


def _inputs(B, H, T, D, N, seed=0):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    q, k = (F.elu(rnd(B, H, T, D)) + 1).requires_grad_(), (F.elu(rnd(B, H, T, D)) + 1).requires_grad_()
    v = rnd(B, H, T, D).requires_grad_()
    f32 = torch.float32
    r = rnd(B, H, T, N, dtype=f32).softmax(-1).requires_grad_()
    w = rnd(B, H, T, N, dtype=f32).softmax(-1).requires_grad_()
    g = torch.sigmoid(rnd(B, H, T, dtype=f32) + 4).requires_grad_()
    return q, k, v, r, w, g


def _fwd_bwd(fn, xs, dout):
    import torch

    def run():
        o = fn(*xs)
        torch.autograd.grad(o, xs, dout)
    return run


def kernel_resources() -> dict:
    """Registers, spills and shared memory of the compiled Triton kernels (as far as exposed)."""
    from blocklm.model import banked_kernels as bk
    from blocklm.model import banked_kernels_bwd as bkb
    from blocklm.model import banked_kernels_var as bkv

    out = {}
    from blocklm.model import banked_kernels_mem as bkm

    for name in ("fwd_h", "fwd_o", "fwd_o_loop", "fwd_o_lean", "bwd_dh", "bwd_intra",
                 "bwd_mem_read", "bwd_mem_write", "bwd_dv_mem", "bwd_hdot", "bwd_decay",
                 "bwd_mem_all"):
        try:
            mod = next(m for m in (bk, bkb, bkv, bkm) if hasattr(m, name))
            caches = getattr(mod, name).device_caches
            for dev_cache in caches.values():
                for ker in dev_cache[0].values():
                    out.setdefault(name, []).append(
                        {"regs": ker.n_regs, "spills": ker.n_spills,
                         "shared": ker.metadata.shared, "warps": ker.metadata.num_warps})
        except Exception as e:  # noqa: BLE001 - diagnostics only, never fail the benchmark
            out[name] = repr(e)[:200]
    return out


# Launch-option variants timed beside the defaults (--sweep; the defaults first and again last:
# run-to-run noise, model/GPU_NOTES.md calls K6-K7). With --profile each variant's kernels are
# profiled too (the fused memory kernels of call kern2-A were judged by that).
# k6: fp32 intra partials, Triton's own launch path, both (= K3's code path).
# kern3: the opt-in kernels of GPU_NOTES "kern, 2026-11-23": the decay's inner products in bwd_dh
# (elementwise, 1, or as a dot's diagonal, 2; bwd_dv_mem at 2 stages: two programs per SM),
# fwd_o_lean (one program per SM at 146 registers; two with a 128 cap and 2 stages, or at 64-wide
# E-tiles), bwd_intra_lean, bwd_dh's prefetches, and all together.
_OLD = {"fwd_o_lean": False, "stages_o": None, "maxnreg_o": None, "intra_lean": False,
        "prefetch_dh": False}  # = banked_triton.OLD_DEFAULTS (the K6 set)
_LEAN2 = {"fwd_o_lean": True, "maxnreg_o": 128, "stages_o": 2}
SWEEPS = {
    "k6": [{}, {"low_partials": False}, {"fast_launch": False},
           {"low_partials": False, "fast_launch": False}, {}],
    # kern4: the new defaults (call kern3's winners) beside hdot_in_dh 2 on top, and the old set
    "kern4": [{}, {"hdot_in_dh": 2, "stages_dv": 2}, _OLD, {}],
    # m1: knobs not re-timed since the kern3 defaults changed the kernels around them (call M1:
    # none faster; its decay_in_h variant, fwd_h making c itself, lost and was removed)
    "m1": [{}, {"prep_in_intra": True}, {"prep_in_intra": False}, {"warps_intra": 8},
           {"stages_mem": 2}, {"stages_mem": 3}, {"warps_dv": 4}, {"stages_dv": 2},
           {"warps_mem": 8}, {"tile_hk": None}, {}],
    "kern3": [{}, {"hdot_in_dh": 1}, {"hdot_in_dh": 1, "stages_dv": 2},
              {"hdot_in_dh": 2, "stages_dv": 2}, {"prefetch_dh": True},
              {"prefetch_dh": True, "hdot_in_dh": 1, "stages_dv": 2},
              {"fwd_o_lean": True}, _LEAN2, {"fwd_o_lean": True, "tile_vo": 64},
              {"intra_lean": True},
              {"hdot_in_dh": 2, "stages_dv": 2, "intra_lean": True, "prefetch_dh": True,
               **_LEAN2}, {}],
    # kern9: the memory parts as one launch of interleaved paths (mem_fuse: dv in 2 or 1
    # E-tiles; tile_dmf: the read/write paths' D-slice; maxnreg_mem 168: three programs per SM)
    "kern9": [{}, {"mem_fuse": 2}, {"mem_fuse": 2, "tile_dmf": 64},
              {"mem_fuse": 2, "tile_dmf": 64, "maxnreg_mem": 168},
              {"mem_fuse": 1, "tile_dmf": 64}, {"mem_fuse": 2, "tile_dmf": 64, "warps_mem": 8},
              {}],
    # kern9b: the fused memory launch as default (kern9's winner) beside the set before it and
    # narrower slices / more programs per SM (ptxas sm_90: D-slice 32: 114 registers, 65 KB, 3
    # per SM; 2 stages 125 / 49 KB, 4; dv in 4 E-tiles 114 / 41 KB, 4; capped at 96, 5) and the
    # output-gradient split inside bwd_intra again (even with the three memory kernels, call M1)
    "kern9b": [{}, {"mem_fuse": 0, "tile_dmf": None, "maxnreg_mem": None},
               {"tile_dmf": 32, "maxnreg_mem": None},
               {"tile_dmf": 32, "stages_mem": 2, "maxnreg_mem": None},
               {"mem_fuse": 4, "tile_dmf": 32, "maxnreg_mem": None},
               {"mem_fuse": 4, "tile_dmf": 32, "maxnreg_mem": 96}, {"prep_in_intra": True}, {}],
    # kern9c: the forward's kernels launched before autograd's bookkeeping (launch_first) or
    # inside it, alternating (a host-latency change: per-call figures only)
    "kern9c": [{}, {"launch_first": False}, {}, {"launch_first": False}, {},
               {"launch_first": False}],
    # kern2 (GPU_NOTES "kern2, 2026-11-23 23:00"): the fused launch's inner-product path
    # pipelined (hdot_mf: depth; 1 = the summed-at-once form unpipelined) and its rows per step
    # (tile_hdf; ptxas sm_90: 168 registers, 0 spilled, 65.5 KB shared for all of these: still
    # three programs per SM), alternating with the defaults
    "kern2": [{}, {"hdot_mf": 3}, {"hdot_mf": 3, "tile_hdf": 64}, {}, {"hdot_mf": 4},
              {"hdot_mf": 2, "tile_hdf": 64}, {"hdot_mf": 1}, {}],
    # kern2b: kern2's winner (hdot_mf 4) against the path before it, alternating (call kern2-2
    # times a checkout whose default is hdot_mf 4, so {} is the candidate there)
    "kern2b": [{}, {"hdot_mf": 0}, {}, {"hdot_mf": 0}, {}, {"hdot_mf": 0}, {}, {"hdot_mf": 0}],
}
SWEEP = SWEEPS["kern9b"]


def _safe(fn):
    """A timing, or the error's name (one failing configuration must not lose the others)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the figures
        return f"error: {type(e).__name__}: {str(e)[:120]}"



def profile_kernels(fn, iters: int = 3) -> list[dict]:
    """Per-kernel device time (ms per iteration) of fn, by torch.profiler, largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:60], "ms": round(t / 1e3 / iters, 4),
                         "calls": e.count // iters})
    return sorted(rows, key=lambda r: -r["ms"])[:14]


@click.command("bench_gpu")
@click.option("--batch", default=4, show_default=True)
@click.option("--heads", default=16, show_default=True)
@click.option("--dim", default=128, show_default=True, help="Head dim D (= value dim E).")
@click.option("--tokens", default="1024,4096,16384", show_default=True)
@click.option("--banks", default=None, type=int,
              help="Bank count N (default: the model's AttentionConfig default).")
@click.option("--chunks", default="64", show_default=True,
              help="Chunk sizes of the Triton kernels to time, comma-separated.")
@click.option("--ref-max-tokens", default=4096, show_default=True,
              help="Skip the PyTorch reference above this length (it is slow).")
@click.option("--reps", default=30, show_default=True, help="Timed repetitions (median).")
@click.option("--sweep", is_flag=True,
              help="Also time launch-setting variants (banked, N banks) at every length.")
@click.option("--sweep-set", type=click.Choice(sorted(SWEEPS)), default="kern9b",
              show_default=True, help="Which list of variants --sweep times.")
@click.option("--profile", "do_profile", is_flag=True,
              help="Also list per-kernel times (torch.profiler) of the banked kernels, N banks.")
@click.option("--baseline", default=None,
              help="Importable modules (comma-separated) with another banked_attention (e.g. "
                   "copies of earlier kernels) to time beside the current one, N banks.")
@click.option("--out", "out_path", default=None, help="Also write the JSON figures here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def bench_gpu(batch, heads, dim, tokens, banks, chunks, ref_max_tokens, reps, sweep, sweep_set,
              do_profile, baseline, out_path, as_json):
    """Forward + backward time of SDPA causal, the banked Triton kernels (N banks and 1 bank) and
    the PyTorch chunked reference, bf16, on CUDA; with a bf16 matmul ceiling.

    \b
    Example:
      blocktool bench gpu --json
      blocktool bench gpu --tokens 1024,4096 --chunks 64,128 --out bench.json
      blocktool bench gpu --sweep --sweep-set kern3 --profile --baseline blk6.banked_triton
    """
    import torch
    import torch.nn.functional as F

    from blocklm.model import banked_triton as bt
    from blocklm.model.config import AttentionConfig

    if not torch.cuda.is_available():
        raise click.ClickException("bench gpu needs a CUDA device (torch.cuda.is_available() "
                                   "is False); run it on the GPU machine")
    if not bt.HAS_TRITON:
        raise click.ClickException("bench gpu needs triton (not importable here)")
    acfg = AttentionConfig()
    N = banks or acfg.banks
    B, H, D = batch, heads, dim
    Ts = [int(t) for t in tokens.split(",")]
    Cs = [int(c) for c in chunks.split(",")]
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "shape": {"B": B, "H": H, "D": D, "banks": N}, "eps": acfg.eps,
                 "matmul_bf16_tflops": round(matmul_tflops(), 1), "rows": []}
    for T in Ts:
        row: dict = {"tokens": T}
        q, k, v, r, w, g = _inputs(B, H, T, D, N, seed=T)
        dout = torch.randn_like(v)

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        row["sdpa_ms"] = _median_ms(_fwd_bwd(sdpa, (q, k, v), dout), reps)
        row["sdpa_queued_ms"] = _queued_ms(_fwd_bwd(sdpa, (q, k, v), dout), reps)
        for bi, bname in enumerate(baseline.split(",") if baseline else []):
            base = importlib.import_module(bname)

            def based(q, k, v, r, w, g, base=base):
                return base.banked_attention(q, k, v, r, w, g, eps=acfg.eps, chunk=Cs[0])[0]
            row[f"baseline{bi or ''}_N{N}_ms"] = _safe(lambda xs=(q, k, v, r, w, g), dout=dout: (
                _median_ms(_fwd_bwd(based, xs, dout), reps)))
        for C in Cs:
            for n_banks in (N, 1):
                xs = (q, k, v, r, w, g) if n_banks == N else (q, k, v) + _inputs(
                    B, H, T, D, 1, seed=T + 1)[3:]

                def banked(q, k, v, r, w, g, C=C):
                    return bt.banked_attention(q, k, v, r, w, g, eps=acfg.eps, chunk=C)[0]
                torch.cuda.reset_peak_memory_stats()
                row[f"banked_N{n_banks}_C{C}_ms"] = _safe(
                    lambda xs=xs, banked=banked, dout=dout: _median_ms(
                        _fwd_bwd(banked, xs, dout), reps))
                row[f"banked_N{n_banks}_C{C}_peak_gib"] = round(
                    torch.cuda.max_memory_allocated() / 2**30, 2)
                if n_banks == N:
                    row[f"banked_N{N}_C{C}_queued_ms"] = _safe(
                        lambda xs=xs, banked=banked, dout=dout: _queued_ms(
                            _fwd_bwd(banked, xs, dout), reps))
                    with torch.no_grad():
                        row[f"banked_N{N}_C{C}_fwd_ms"] = _safe(lambda xs=xs, banked=banked: (
                            _median_ms(lambda: banked(*xs), reps)))
                if n_banks == N and C == Cs[0] and do_profile:
                    res.setdefault("profile", {})[str(T)] = profile_kernels(
                        _fwd_bwd(banked, xs, dout))
                if n_banks == N and C == Cs[0] and sweep:
                    for variant in SWEEPS[sweep_set]:
                        saved = dict(bt.KERNEL_OPTS)
                        bt.KERNEL_OPTS.update(variant)
                        ms = _safe(lambda xs=xs, banked=banked, dout=dout: _median_ms(
                            _fwd_bwd(banked, xs, dout), reps))
                        key = f"{T} {' '.join(f'{a}={b}' for a, b in variant.items())}"
                        if do_profile and variant and key not in res["profile"]:  # per kernel
                            res["profile"][key] = _safe(lambda xs=xs, banked=banked, dout=dout: (
                                profile_kernels(_fwd_bwd(banked, xs, dout))))
                        bt.KERNEL_OPTS.clear()
                        bt.KERNEL_OPTS.update(saved)
                        res.setdefault("sweep", []).append({"tokens": T, "opts": variant, "ms": (
                            round(ms, 3) if isinstance(ms, float) else ms)})
        # SDPA again after the banked runs: the first timing of a run can catch the clocks low;
        # the table reports the lower of the two medians (the baseline's better figure)
        again = _median_ms(_fwd_bwd(sdpa, (q, k, v), dout), reps)
        row["sdpa_runs_ms"] = [round(row["sdpa_ms"], 3), round(again, 3)]
        row["sdpa_ms"] = min(row["sdpa_ms"], again)
        if T <= ref_max_tokens:
            def ref(q, k, v, r, w, g):
                return bt.banked_attention_reference(q, k, v, r, w, g, eps=acfg.eps,
                                                     chunk=acfg.chunk)[0].to(v.dtype)
            row[f"reference_N{N}_ms"] = _median_ms(_fwd_bwd(ref, (q, k, v, r, w, g), dout),
                                                   min(reps, 5), warmup=1)
        res["rows"].append({k_: (round(x, 3) if isinstance(x, float) else x)
                            for k_, x in row.items()})
        del q, k, v, r, w, g, dout
        torch.cuda.empty_cache()
    res["baselines"] = baseline.split(",") if baseline else []
    res["kernels"] = kernel_resources()
    if out_path:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    if as_json:
        click.echo(json.dumps(res))
        return
    _table(res, N, Cs)


def _table(res: dict, N: int, Cs: list[int]) -> None:
    s = res["shape"]
    for T, rows in res.get("profile", {}).items():
        for r in (rows[:12] if isinstance(rows, list) else [{"ms": -1, "calls": 0,
                                                              "kernel": str(rows)}]):
            click.echo(f"profile T={T} {r['ms']:9.3f} ms x{r['calls']:<3} {r['kernel']}")
    for r in res.get("sweep", []):
        click.echo(f"sweep T={r['tokens']} {r['ms']} ms  {r['opts'] or 'defaults'}")
    click.echo(f"{res['device']}, torch {res['torch']}; bf16 matmul "
               f"{res['matmul_bf16_tflops']} TFLOP/s; fwd+bwd ms (median, CUDA events), "
               f"B={s['B']} H={s['H']} D={s['D']}")
    names = res.get("baselines", [])
    base = [f"baseline{i or ''}_N{N}_ms" for i in range(len(names))]
    cols = ["sdpa_ms"] + base + [f"banked_N{n}_C{c}_ms" for c in Cs for n in (N, 1)] + \
        [f"reference_N{N}_ms"]
    heads = ["SDPA causal"] + [f"{b.split('.')[0][:9]} N={N}" for b in names] + \
        [f"banked N={n} C={c}" for c in Cs for n in (N, 1)] + [f"PyTorch ref N={N}"]
    click.echo(f"{'tokens':>7} " + " ".join(f"{h:>16}" for h in heads))
    for row in res["rows"]:
        cells = [f"{row[c]:16.3f}" if isinstance(row.get(c), float)
                 else f"{'err' if c in row else '-':>16}" for c in cols]
        click.echo(f"{row['tokens']:>7} " + " ".join(cells))
    qcols = ["sdpa_queued_ms"] + [f"banked_N{N}_C{c}_queued_ms" for c in Cs]
    click.echo("calls queued back to back (the host ahead, as in training): "
               + ", ".join(qcols))
    for row in res["rows"]:
        click.echo(f"{row['tokens']:>7} " + " ".join(
            f"{row[c]:16.3f}" if isinstance(row.get(c), float) else f"{'-':>16}" for c in qcols))

"""``blocktool bench heads``: the image and audio element heads' loss, eager, compiled, kernels.

One batch of decoder outputs through ``PatchSupport.bits`` (the training loss: checkpointed
slices of ``loss_chunk`` steps, bf16 autocast on CUDA), forward + backward, for each form of
:mod:`blocklm.model.patch_fused` side by side in one process: "eager" (the baseline: the ops one
by one) and "inductor" (``compile_head``, used on CUDA without TMA), and the Triton kernels of
:mod:`blocklm.model.patch_triton` ("triton", ``fused_head``, the default on CUDA with TMA since
GPU_NOTES P153). Reports the median ms of ``--reps`` calls after a first call (which
compiles), the peak memory, and how far each form's bits and gradients are from the first
form's. Inputs: random decoder outputs and element values near a random level per step
(neighbouring sub-pixels are alike, so value rows repeat as in real images).
"""

from __future__ import annotations

import json
import statistics
import time

import click


def _batch(sup, B: int, T: int, device, seed: int):
    import torch

    from blocklm.model.batch import BlockBatch

    g = torch.Generator(device="cpu").manual_seed(seed)
    E = sup.elements_per_step
    level = torch.randint(0, 256, (B, T, 1), generator=g)
    targets = (level + torch.randint(-6, 7, (B, T, E), generator=g)).clamp(0, 255)
    mask = torch.ones(B, T, E, dtype=torch.bool)
    z = torch.zeros(B, T, dtype=torch.bool)
    batch = BlockBatch(sup.name, [], targets, z, torch.zeros(B, T, sup.position_dims),
                       torch.zeros(B, sup.cond_dims), targets, mask, ~z, torch.ones(B))
    return batch.to(device)


def measure(sup, B: int, T: int, d_model: int, forms: list[str], reps: int,
            device: str, seed: int = 0) -> list[dict]:
    """Each form's forward + backward of one B x T batch: ms, first call s, peak GiB and the
    largest relative differences to the first form's bits and gradients."""
    import torch

    cuda = torch.device(device).type == "cuda"
    batch = _batch(sup, B, T, device, seed)
    torch.manual_seed(seed)
    h = torch.randn(B, T, d_model, device=device,
                    dtype=torch.bfloat16 if cuda else torch.float32).requires_grad_(True)

    def once() -> list:
        for p in sup.parameters():
            p.grad = None
        h.grad = None
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
            bits = sup.bits(h, batch)[0]
        bits.sum().backward()
        return [bits.detach().float(), h.grad.float(), sup.head.val.grad]

    def timed() -> float:
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            once()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter()
        once()
        return (time.perf_counter() - t0) * 1e3

    rows, first_out = [], None
    for form in forms:
        sup.head_form = form
        t0 = time.perf_counter()
        out = [t.clone() for t in once()]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        first = time.perf_counter() - t0
        ms = statistics.median(timed() for _ in range(reps))
        row = {"mode": sup.name, "form": form, "B": B, "T": T, "E": sup.elements_per_step,
               "ms": round(ms, 2), "first_s": round(first, 1),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        if first_out is None:
            first_out = out
        else:  # agreement with the baseline form: bits, d/dh, d/d value table
            for name, a, b in zip(("bits", "dh", "dval"), out, first_out):
                row[f"rel_{name}"] = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        rows.append(row)
    sup.head_form = None
    return rows


FORMS = ("eager", "inductor", "aot_eager", "triton")


def _batch_shape(ctx, param, text: str) -> tuple[int, int]:
    """``BxT`` -> (B, T), both positive."""
    try:
        B, T = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a batch shape like 32x2401") from None
    if B < 1 or T < 1:
        raise click.BadParameter(f"{text!r}: B and T must be at least 1")
    return B, T


def _forms(ctx, param, text: str) -> list[str]:
    forms = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise click.BadParameter(f"{bad or text!r}: forms are {', '.join(FORMS)}")
    return forms


@click.command("heads")
@click.option("--preset", default="small", show_default=True,
              type=click.Choice(["tiny", "small"]), help="Model preset (heads' sizes).")
@click.option("--image", "image_bt", default="32x2401", show_default=True,
              callback=_batch_shape,
              help="Image batch BxT (T steps of one patch; `small`: 480x320 images = 2,401).")
@click.option("--audio", "audio_bt", default="64x1000", show_default=True,
              callback=_batch_shape, help="Audio batch BxT (T frames).")
@click.option("--forms", default="eager,inductor", show_default=True, callback=_forms,
              help="Forms, the first is the baseline (eager, inductor, aot_eager, triton).")
@click.option("--reps", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed calls per form (median).")
@click.option("--device", default=None, help="Default: cuda if available, else cpu.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON too.")
def bench_heads(preset, image_bt, audio_bt, forms, reps, device, as_json):
    """Image/audio element heads' loss: eager, torch.compile, Triton kernels, one process.

    \b
    Example (the H200 figures in the README):
      blocktool bench heads --json
      blocktool bench heads --image 20x2401 --forms inductor,triton
      blocktool bench heads --device cpu --image 2x40 --audio 2x40 --forms eager,aot_eager
    """
    import torch

    from blocklm.model import presets
    from blocklm.model.audio import AudioSupport
    from blocklm.model.image import ImageSupport

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = getattr(presets, preset)(tokenizer_path=None)
    d = cfg.decoder.d_model
    rows = []
    for cls, name, (B, T) in ((ImageSupport, "image", image_bt),
                              (AudioSupport, "audio", audio_bt)):
        sup = cls(cfg.modes[name], d).to(device)
        rows += measure(sup, B, T, d, forms, reps, device)
    if as_json:
        click.echo(json.dumps(rows))
    click.echo(f"{'mode':<6} {'form':<10} {'B x T x E':>16} {'ms':>9} {'x base':>7} "
               f"{'first s':>8} {'peak GiB':>9} {'rel d/dh':>9}")
    for r in rows:
        base = next(b["ms"] for b in rows if b["mode"] == r["mode"])
        click.echo(f"{r['mode']:<6} {r['form']:<10} {r['B']:>5} x {r['T']:>4} x {r['E']:>3} "
                   f"{r['ms']:>9} {base / r['ms']:>6.2f}x {r['first_s']:>8} "
                   f"{str(r['peak_gib']):>9} {r.get('rel_dh', 0.0):>9.2e}")

"""The layer's end on CUDA, PyTorch against the fused kernels (model/add_norm_triton.py), side by
side in one run.

Times ``rms_norm(x + f + bias) * weight`` forward and backward (CUDA events, median) at a mixed
step's sizes: the bf16 stream of an image batch (84,000 rows of 768), the fp32 stream of a text
batch (40,000 rows), the core's width (384). "PyTorch" is what the plain layer runs: the bias
added to f in bf16 (the addmm epilogue), the residual add, the norm (``rms_norm_low`` for a bf16
stream, ``F.rms_norm`` for fp32); "kernels" is :func:`~blocklm.model.add_norm_triton.add_norm`.

    blocktool bench add-norm
    python -m blocklm.tools.bench_add_norm --shapes 84000x768:bf16 --reps 50 --json
"""

from __future__ import annotations

import json

import click
import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def time_layer_end(M: int, D: int, stream: torch.dtype, reps: int = 20) -> dict:
    """ms of the layer end at [M, D] (x in ``stream``, f bf16): PyTorch and the kernels,
    forward + backward, and the kernels' forward alone."""
    from blocklm.model.add_norm_triton import add_norm
    from blocklm.model.decoder import rms_norm_low

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(M, D, device=dev, dtype=stream, requires_grad=True)
    f = torch.randn(M, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(D, device=dev, requires_grad=True)
    w = (torch.rand(D, device=dev) + 0.5).requires_grad_(True)
    g = torch.randn(M, D, device=dev, dtype=stream)

    def plain():
        s = x + (f + b.to(f.dtype))
        y = (rms_norm_low(s, (D,), w, None) if stream == torch.bfloat16
             else F.rms_norm(s, (D,), w))
        torch.autograd.backward(y, g)

    def kernels():
        y, _ = add_norm(x, f, b, w, None, torch.bfloat16)
        torch.autograd.backward(y, g)

    def kernels_forward():
        with torch.no_grad():
            add_norm(x, f, b, w, None, torch.bfloat16)

    return {"rows": M, "width": D, "stream": str(stream).replace("torch.", ""),
            "pytorch_ms": _median_ms(plain, reps), "kernels_ms": _median_ms(kernels, reps),
            "kernels_forward_ms": _median_ms(kernels_forward, reps)}


def parse_shape(item: str) -> tuple[int, int, torch.dtype]:
    """"84000x768:bf16" -> (84000, 768, torch.bfloat16); click's BadParameter otherwise."""
    try:
        size, dt = item.split(":")
        M, D = (int(v) for v in size.lower().split("x"))
        if M < 1 or D < 1:
            raise ValueError
        return M, D, DTYPES[dt]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{item!r}: expected ROWSxWIDTH:bf16|fp32 (positive sizes)",
                                 param_hint="--shapes") from None


@click.command("add-norm")
@click.option("--shapes", default="84000x768:bf16,40000x768:fp32,84000x384:bf16",
              show_default=True, help="ROWSxWIDTH:STREAM, comma-separated (STREAM bf16 or fp32).")
@click.option("--reps", default=20, show_default=True, help="Timed repetitions (median).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list instead of a table.")
def bench_add_norm(shapes: str, reps: int, as_json: bool) -> None:
    """Time the layer's end, PyTorch against the fused kernels (CUDA and Triton needed)."""
    from blocklm.model.add_norm_triton import HAS_TRITON

    cases = [parse_shape(item) for item in shapes.split(",")]
    if not (torch.cuda.is_available() and HAS_TRITON):
        raise click.ClickException("needs a CUDA device and Triton (the kernels are CUDA only)")
    rows = [time_layer_end(M, D, stream, reps) for M, D, stream in cases]
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'rows':>8} {'width':>6} {'stream':>9} {'PyTorch ms':>11} {'kernels ms':>11}"
               f" {'(forward)':>10}")
    for r in rows:
        click.echo(f"{r['rows']:>8} {r['width']:>6} {r['stream']:>9} {r['pytorch_ms']:>11.3f} "
                   f"{r['kernels_ms']:>11.3f} {r['kernels_forward_ms']:>10.3f}")


if __name__ == "__main__":
    bench_add_norm()

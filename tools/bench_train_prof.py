"""Profile exports of ``blocktool bench train --trace DIR``: where one optimizer step goes.

Writes, per profiled run, ``<tag>.trace.json.gz`` (a chrome trace, gzipped: open it in
chrome://tracing or Perfetto), ``<tag>.ops.txt`` (the top CPU ops by self time, the top ops by
GPU time, and the named ranges of the runners and the model: ``blocklm:*``), ``<tag>.launches.txt``
(kernel launches by the autograd node or forward op that made them, :mod:`.bench_train_launches`)
and returns a dict of the named ranges' host milliseconds, the GPU's busy time and the launch
counts for the JSON summary.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

from .bench_train_launches import count_launches, launch_table


def _dev_total(ev) -> float:
    """Device (CUDA) time of an event, microseconds, across torch versions."""
    return getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0))


def _self_dev(ev) -> float:
    return getattr(ev, "self_device_time_total", getattr(ev, "self_cuda_time_total", 0.0))


def export_profile(prof, out_dir: str | Path, tag: str, rows: int = 30) -> dict:
    """Write the trace, the op tables and the launch table of ``prof`` under ``out_dir``;
    return the ranges (``blocklm:*`` host ms and calls), the host time of the syncs, the GPU
    busy time and the launch counts (total, the 12 largest sources)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    avg = prof.key_averages()
    text = [f"== {tag}: top {rows} ops by self CPU time ==",
            avg.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)]
    try:  # the sort key's name differs across torch versions
        text += [f"== {tag}: top {rows} ops by GPU time ==",
                 avg.table(sort_by="self_device_time_total", row_limit=rows,
                           max_name_column_width=60)]
    except (KeyError, AttributeError, ValueError):
        text += [f"== {tag}: top {rows} ops by GPU time ==",
                 avg.table(sort_by="self_cuda_time_total", row_limit=rows,
                           max_name_column_width=60)]
    ranges = {ev.key: {"host_ms": round(ev.cpu_time_total / 1e3, 1), "calls": ev.count}
              for ev in avg if ev.key.startswith(("blocklm:", "bench:"))}
    text += [f"== {tag}: named ranges (host ms inclusive, calls) =="]
    text += [f"{k:<40} {v['host_ms']:>10} {v['calls']:>6}" for k, v in sorted(ranges.items())]
    # host time blocked on the GPU: every .item()/float()/.tolist() of a CUDA tensor
    syncs = {ev.key: {"host_ms": round(ev.cpu_time_total / 1e3, 1), "calls": ev.count}
             for ev in avg if ev.key in ("aten::_local_scalar_dense", "aten::item",
                                         "cudaStreamSynchronize", "cudaDeviceSynchronize",
                                         "cudaMemcpyAsync", "aten::to", "aten::copy_")}
    busy = sum(_self_dev(ev) for ev in avg if ev.device_type is not None
               and "CUDA" in str(ev.device_type)) / 1e3
    (out / f"{tag}.ops.txt").write_text("\n".join(text) + "\n")
    total, by, cuda = count_launches(prof.events())
    (out / f"{tag}.launches.txt").write_text(launch_table(tag, total, by, cuda))
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as f, gzip.open(out / f"{tag}.trace.json.gz", "wb", 6) as g:
            shutil.copyfileobj(f, g)
    return {"ranges": ranges, "syncs": syncs, "gpu_kernel_ms": round(busy, 1),
            "cpu_op_launches": sum(ev.count for ev in avg if ev.key.startswith("aten::")),
            "launches": total, "launches_cuda": cuda,
            "launches_top": [[ph, src, n] for (ph, src), n in by.most_common(12)]}

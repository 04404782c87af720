"""``blocktool inspect``: a dataset audit from its manifest and indexes alone (no payload reads).

Counts samples, shards, bytes, blocks and codecs per mode, the compression ratio (payload bytes /
stored bytes), and per-mode shape distributions: per-dimension min / median / max, the most common
shapes (images as ``H x W x C``) and a histogram of element counts on log-spaced bins.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from blocklm.formats import iter_index, read_manifest, resolve_dataset

from .dataset_open import opener_for

HIST_BINS = 12


@dataclass
class ModeShapes:
    """Shapes of one mode's blocks (plus audio durations when sample rates are known)."""

    shapes: list[tuple[int, ...]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def _stats(values: list[float]) -> dict:
    v = sorted(values)
    n = len(v)
    med = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return {"min": v[0], "median": med, "max": v[-1]}


def histogram(values: list[float], bins: int = HIST_BINS) -> dict:
    """Counts on ``bins`` log-spaced bins between min and max (linear if any value is 0)."""
    lo, hi = min(values), max(values)
    if lo == hi:
        return {"edges": [lo, hi], "counts": [len(values)]}
    if lo > 0:
        a, b = math.log(lo), math.log(hi)
        edges = [math.exp(a + (b - a) * i / bins) for i in range(bins + 1)]
    else:
        edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    counts = [0] * bins
    for x in values:
        i = 0 if x <= edges[0] else min(bins - 1, max(0, _bin(edges, x)))
        counts[i] += 1
    return {"edges": [round(e, 3) for e in edges], "counts": counts}


def _bin(edges: list[float], x: float) -> int:
    import bisect

    return bisect.bisect_right(edges, x) - 1


def shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(str(d) for d in shape) if shape else "scalar"


DIM_NAMES = {"image": ["H", "W", "C"], "audio": ["frames", "channels"], "text": ["chars"]}


def dim_names(kind: str, nd: int) -> list[str]:
    names = DIM_NAMES.get(kind, [])
    return names if len(names) == nd else [f"d{i}" for i in range(nd)]


def shape_summary(ms: ModeShapes, kind: str = "") -> dict:
    """The JSON summary of one mode's shapes; ``kind`` (image/audio/text) names the dims."""
    ndims = Counter(len(s) for s in ms.shapes)
    nd = ndims.most_common(1)[0][0]
    same = [s for s in ms.shapes if len(s) == nd]
    out = {
        "count": len(ms.shapes),
        "dim_names": dim_names(kind, nd),
        "ndim": dict(sorted(ndims.items())),
        "dims": [_stats([s[i] for s in same]) for i in range(nd)],
        "numel": _stats([math.prod(s) for s in ms.shapes]),
        "histogram": histogram([math.prod(s) for s in ms.shapes]),
        "top": [[shape_text(s), c] for s, c in Counter(ms.shapes).most_common(5)],
    }
    if ms.seconds:
        out["seconds"] = {k: round(v, 3) for k, v in _stats(ms.seconds).items()}
    return out


def summarize(path: str) -> dict:
    """The audit of the dataset at ``path`` (folder, manifest, .tar or URL) as one JSON object."""
    opener = opener_for(path)
    shards = resolve_dataset(path, opener=opener)
    totals: dict[str, dict[str, int]] = {}
    total_bytes = None
    if not path.endswith(".tar"):
        manifest = read_manifest(path, opener=opener)
        totals, total_bytes = manifest.modes, manifest.bytes
    shapes: dict[str, ModeShapes] = defaultdict(ModeShapes)
    codecs: dict[str, Counter] = defaultdict(Counter)
    blocks: Counter = Counter()
    per_sample: Counter = Counter()
    samples = 0
    shard_bytes: dict[str, int] = {}
    payload = stored = 0
    for shard, entry in iter_index(path, opener=opener):
        samples += 1
        shard_bytes.setdefault(shard, 0)
        per_sample[" + ".join(b.mode for b in entry.blocks)] += 1
        for b in entry.blocks:
            blocks[b.mode] += 1
            codecs[b.mode][b.codec] += 1
            payload += b.size
            stored += b.stored
            ms = shapes[b.mode]
            ms.shapes.append(b.shape)
            sr = b.meta.get("sample_rate")
            if isinstance(sr, int) and sr > 0 and b.shape:
                ms.seconds.append(b.shape[0] / sr)
    if total_bytes is None:  # a single .tar: no manifest
        total_bytes = sum(opener(s.url).size() for s in shards)
    return {
        "path": path,
        "samples": samples,
        "shards": len(shards),
        "bytes": total_bytes,
        "payload_bytes": payload,
        "stored_bytes": stored,
        "compression": round(payload / stored, 3) if stored else 1.0,
        "blocks": dict(sorted(blocks.items())),
        "codecs": {m: dict(sorted(c.items())) for m, c in sorted(codecs.items())},
        "layouts": dict(per_sample.most_common()),
        "modes": totals,
        "shapes": {m: shape_summary(ms, mode_kind(codecs[m])) for m, ms in sorted(shapes.items())},
    }


def mode_kind(codecs: Counter) -> str:
    """image / audio / text / other, from the codecs a mode's blocks use."""
    from blocklm.formats.codecs import AUDIO_FILE_CODECS, IMAGE_FILE_CODECS

    c = codecs.most_common(1)[0][0]
    if c in IMAGE_FILE_CODECS or c == "u8":
        return "image"
    if c in AUDIO_FILE_CODECS or c in ("pcm16", "f32"):
        return "audio"
    return "text" if c in ("utf8", "tok16", "tok32") else "other"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_summary(s: dict) -> str:
    """The human-readable audit."""
    lines = [f"{s['path']}: {s['samples']} samples in {s['shards']} shards, {_mb(s['bytes'])} "
             f"(payload {_mb(s['payload_bytes'])}, stored {_mb(s['stored_bytes'])}, "
             f"compression {s['compression']:.2f}x)"]
    lines.append("sample layouts: " + ", ".join(f"{k} ({v})" for k, v in s["layouts"].items()))
    for mode, n in s["blocks"].items():
        sh = s["shapes"][mode]
        codecs = ", ".join(f"{c} {k}" for c, k in s["codecs"][mode].items())
        lines.append(f"\n[{mode}] {n} blocks ({codecs})")
        dims = "  ".join(f"{name}: {d['min']}/{d['median']:g}/{d['max']}"
                         for name, d in zip(sh["dim_names"], sh["dims"]))
        lines.append(f"  dims min/median/max: {dims}")
        lines.append("  most common shapes: " + ", ".join(f"{t} ({c})" for t, c in sh["top"]))
        if "seconds" in sh:
            d = sh["seconds"]
            lines.append(f"  seconds min/median/max: {d['min']}/{d['median']}/{d['max']}")
        lines.append("  elements histogram:")
        h = sh["histogram"]
        peak = max(h["counts"]) or 1
        for i, c in enumerate(h["counts"]):
            lo, hi = h["edges"][i], h["edges"][i + 1]
            lines.append(f"    {lo:>12,.0f} - {hi:<12,.0f} {c:>7} {'#' * round(30 * c / peak)}")
    return "\n".join(lines)

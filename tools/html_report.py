"""``blocktool inspect --html``: one self-contained page (no external files) with shape
histograms per mode, a grid of image thumbnails, audio waveforms and text excerpts.

The numbers come from the indexes (``inspect_report.summarize``); the pictures read the payloads
of a few samples spread evenly over the dataset (thumbnails are embedded as base64 JPEG).
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from blocklm.formats import FormatError, ShardReader, iter_index, resolve_dataset

from .dataset_open import opener_for
from .inspect_report import format_summary, mode_kind

PICKS = {"image": 24, "audio": 8, "text": 8}
CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px}h2{border-bottom:1px solid #ccc}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;font-size:11px;text-align:center}
pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}.ex{border-left:3px solid #89c;
padding-left:.6em;margin:.6em 0;white-space:pre-wrap;font-family:serif}"""


def pick_samples(path: str, summary: dict, opener) -> dict[str, list[tuple[str, int, str]]]:
    """Per kind, up to ``PICKS[kind]`` (shard, index in shard, key), evenly spread."""
    kinds = {m: mode_kind(_counter(c)) for m, c in summary["codecs"].items()}
    cands: dict[str, list] = {k: [] for k in PICKS}
    pos: dict[str, int] = {}
    for shard, e in iter_index(path, opener=opener):
        i = pos.get(shard, 0)
        pos[shard] = i + 1
        for k in {kinds[b.mode] for b in e.blocks} & set(PICKS):
            cands[k].append((shard, i, e.key))
    out = {}
    for k, c in cands.items():
        n = min(PICKS[k], len(c))
        out[k] = [c[j * len(c) // n] for j in range(n)] if n else []
    return out


def _counter(d: dict):
    from collections import Counter

    return Counter(d)


def thumbnail(payload: bytes, size: int = 160) -> str:
    """A base64 JPEG data URI of an encoded image, at most ``size`` pixels on its long side."""
    from PIL import Image

    img = Image.open(io.BytesIO(payload))
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def waveform_svg(samples: np.ndarray, width: int = 480, height: int = 60) -> str:
    """An inline SVG of a waveform's min/max envelope."""
    x = samples.astype(np.float32).mean(axis=1) if samples.ndim == 2 else samples
    peak = float(np.abs(x).max()) or 1.0
    cols = np.array_split(x / peak, width) if len(x) >= width else [x[i:i + 1] for i in
                                                                    range(len(x))]
    pts = []
    for i, c in enumerate(cols):
        if len(c):
            xi = i * width / max(len(cols), 1)
            pts.append(f"M{xi:.1f},{height / 2 * (1 - c.max()):.1f}"
                       f"V{height / 2 * (1 - c.min()):.1f}")
    return (f'<svg width="{width}" height="{height}"><path d="{"".join(pts)}" '
            f'stroke="#36c" stroke-width="1"/></svg>')


def histogram_svg(hist: dict, width: int = 420, height: int = 110) -> str:
    """An inline SVG bar chart of a log-binned histogram."""
    counts, edges = hist["counts"], hist["edges"]
    peak = max(counts) or 1
    bw = width / len(counts)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 20 - (height - 30) * c / peak:.1f}" '
        f'width="{bw - 2:.1f}" height="{(height - 30) * c / peak:.1f}" fill="#89c">'
        f'<title>{edges[i]:,.0f} - {edges[i + 1]:,.0f}: {c}</title></rect>'
        for i, c in enumerate(counts))
    labels = (f'<text x="0" y="{height - 5}" font-size="10">{edges[0]:,.0f}</text>'
              f'<text x="{width}" y="{height - 5}" font-size="10" text-anchor="end">'
              f'{edges[-1]:,.0f} elements</text>')
    return f'<svg width="{width}" height="{height}">{bars}{labels}</svg>'


def render_html(path: str, summary: dict) -> str:
    """The whole page as a string."""
    opener = opener_for(path)
    picks = pick_samples(path, summary, opener)
    readers: dict[str, ShardReader] = {}
    index_xxh3 = {s.url: s.index_xxh3 for s in resolve_dataset(path, opener=opener)}
    esc = html.escape
    body = [f"<h1>{esc(path)}</h1><pre>{esc(format_summary(summary))}</pre><h2>Shapes</h2>"]
    for mode, sh in summary["shapes"].items():
        body.append(f"<h3>{esc(mode)}: {sh['count']} blocks</h3>{histogram_svg(sh['histogram'])}")
    sections = {"image": [], "audio": [], "text": []}
    for kind, chosen in picks.items():
        for shard, i, key in chosen:
            r = readers.get(shard) or readers.setdefault(
                shard, ShardReader(shard, opener=opener, index_xxh3=index_xxh3.get(shard)))
            try:
                sample = r[i]
            except FormatError as e:
                sections[kind].append(f"<p>{esc(key)}: unreadable ({esc(str(e))})</p>")
                continue
            for b in sample.blocks:
                if mode_kind(_counter({b.codec: 1})) != kind:
                    continue
                sections[kind].append(_render_block(kind, key, b))
                break
    body.append("<h2>Images</h2><div class='grid'>" + "".join(sections["image"]) + "</div>")
    body.append("<h2>Audio</h2>" + "".join(sections["audio"]))
    body.append("<h2>Text</h2>" + "".join(sections["text"]))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(path)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def _render_block(kind: str, key: str, b) -> str:
    esc = html.escape
    label = f"{esc(key)}<br>{' x '.join(map(str, b.shape))}"
    try:
        if kind == "image":
            if b.codec == "u8":
                from PIL import Image

                arr = b.decode()
                buf = io.BytesIO()
                Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, "PNG")
                src = thumbnail(buf.getvalue())
            else:
                src = thumbnail(b.payload)
            return f"<figure><img src='{src}' alt='{esc(key)}'><figcaption>{label}</figcaption>" \
                   "</figure>"
        if kind == "audio":
            sr = b.meta.get("sample_rate") or 1
            return f"<p>{esc(key)} ({b.shape[0] / sr:.2f} s)<br>{waveform_svg(b.decode())}</p>"
        text = b.decode() if b.codec == "utf8" else f"[{b.shape[0]} token ids]"
        excerpt = text[:400] + ("..." if len(text) > 400 else "")
        return f"<p><b>{esc(key)}</b></p><div class='ex'>{esc(excerpt)}</div>"
    except (FormatError, OSError, ValueError) as e:
        return f"<p>{esc(key)}: cannot render ({esc(str(e))})</p>"

"""Sample keys derived deterministically from input paths (README: "Keys").

A key is the input's name followed by the file's path relative to that input, without its
extension; every character outside ``[A-Za-z0-9_-]`` becomes ``_`` and path separators stay
``/``. A key longer than 64 characters keeps its first 47 characters and ends in ``-`` plus 16 hex
digits of the xxh3 of the full relative path. Two inputs that would share a key (``a.png`` and
``a.jpg``) are told apart by ``-`` plus 8 hex digits of the second one's path.
"""

from __future__ import annotations

import re

import xxhash

from blocklm.formats.block import MAX_KEY_CHARS

_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def sanitize_segment(seg: str) -> str:
    """One path segment as key characters (never empty)."""
    # most names need no change: ASCII letters and digits with _ and - (three C calls instead
    # of a regex substitution; a conversion's walk does this once per file)
    if seg.isascii() and seg.replace("_", "a").replace("-", "a").isalnum():
        return seg
    return _BAD.sub("_", seg) or "_"


def strip_ext(name: str) -> str:
    """``name`` without its last extension (``a.b.png`` -> ``a.b``; ``.hidden`` unchanged)."""
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def path_key(prefix: str, rel: str) -> str:
    """The key of relative path ``rel`` (``/``-separated) under input name ``prefix``."""
    parts = [p for p in rel.split("/") if p]
    if parts:
        parts[-1] = strip_ext(parts[-1])
    segs = [sanitize_segment(p) for p in ([prefix] if prefix else []) + parts]
    return fit_key("/".join(segs), rel)


def fit_key(key: str, seed: str) -> str:
    """``key`` shortened to the format's limit with a hash of ``seed`` when it is too long."""
    if len(key) <= MAX_KEY_CHARS:
        return key
    head = key[:MAX_KEY_CHARS - 17].strip("/")
    head = re.sub(r"/+", "/", head)
    return f"{head}-{xxhash.xxh3_64_hexdigest(seed.encode('utf-8'))}"


class KeyAllocator:
    """Hands out unique keys in input order; a clash gets a suffix from the input's identity."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def take(self, key: str, seed: str) -> str:
        """``key`` (shortened to fit) if unused, else ``key-HASH8`` (and ``-N`` if even that is
        taken)."""
        used = self.used
        if len(key) <= MAX_KEY_CHARS and key not in used:  # most keys: fits, unused
            used.add(key)
            return key
        key = out = fit_key(key, seed)
        if out in self.used:
            h = xxhash.xxh32_hexdigest(seed.encode("utf-8"))
            out = fit_key(key[:MAX_KEY_CHARS - 9] + "-" + h, seed + "#")
            n = 1
            while out in self.used:
                out = fit_key(f"{key[:MAX_KEY_CHARS - 20]}-{h}-{n}", f"{seed}#{n}")
                n += 1
        self.used.add(out)
        return out

"""Input detection and the file-based sources: folders, text, JSONL text, sample manifests.

Every source yields :class:`Item`s in a deterministic order (sorted paths, file order, line
order). A directory is walked recursively in sorted order and each file is converted by its own
kind (its extension); hidden files and folders (``.name``) are skipped and listed in the report.
Keys follow :mod:`blocklm.tools.convert_keys`: ``INPUTNAME/relative/path`` for one-sample files,
plus ``/NNNNNN`` (passage or line number) for files that hold many samples.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from blocklm.formats import FormatError, check_key

from .convert_items import AUDIO_EXTS, IMAGE_EXTS, Item, Part, how_for_ext
from .convert_keys import (
    MAX_KEY_CHARS,
    KeyAllocator,
    fit_key,
    path_key,
    sanitize_segment,
    strip_ext,
)
from .convert_options import ConvertOptions, parse_text_split

FILE_KINDS = {"tar": "wds", "parquet": "parquet", "jsonl": "jsonl_or_manifest"}


def ext_of(path: str) -> str:
    return path.rpartition(".")[2].lower() if "." in os.path.basename(path) else ""


def is_hf_dir(path: Path) -> bool:
    """A folder written by ``datasets`` ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()) or \
        (path / "dataset_dict.json").is_file()


def detect_kind(path: str, forced: str | None = None) -> str:
    """The kind of one input: ``dir`` (mixed, by extension), ``hf``, or a file kind."""
    p = Path(path)
    if forced is not None:
        return forced
    if p.is_dir():
        return "hf" if is_hf_dir(p) else "dir"
    return file_kind(path)


def file_kind(path: str) -> str:
    """The kind of a path known not to be a folder, by its extension (no file system access)."""
    ext = ext_of(path)
    if ext in IMAGE_EXTS:
        return "images"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext == "jsonl":
        return "manifest" if is_sample_manifest(path) else "jsonl"
    if ext in FILE_KINDS:
        return FILE_KINDS[ext]
    if how_for_ext(ext) == "text":
        return "text"
    return "unknown"


def is_sample_manifest(path: str) -> bool:
    """A JSONL file whose first non-blank line is a list of blocks or has a ``blocks`` field."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, list) or (isinstance(obj, dict) and "blocks" in obj)
    except (OSError, ValueError):
        return False
    return False


def walk_files(root: Path, skipped: list[str],
               exclude: str | None = None) -> Iterator[tuple[str, str]]:
    """``(path, path relative to root)`` of the files under ``root`` in sorted order, skipping
    hidden names and the folder ``exclude`` (the conversion's own output), each recorded in
    ``skipped``. Paths are spelled as ``str(Path(dirpath) / name)``."""
    for base, rel_dir, names in walk_dirs(root, skipped, exclude):
        for name in names:
            yield base + name, rel_dir + name


def walk_dirs(root: Path, skipped: list[str],
              exclude: str | None = None) -> Iterator[tuple[str, str, list[str]]]:
    """:func:`walk_files` a folder at a time: ``(base, rel_dir, names)``, where ``base + name``
    is a file's path and ``rel_dir + name`` its path relative to ``root``. Paths are joined as
    strings, once per folder through ``pathlib``, since a walk can list millions of files."""
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if d.startswith(".") or (exclude and os.path.realpath(full) == exclude):
                skipped.append(full)
            else:
                keep.append(d)
        dirnames[:] = keep
        here = Path(dirpath)
        base = str(here)
        base = "" if base == "." else (base if base.endswith("/") else base + "/")
        rel_dir = here.relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        names = []
        for name in sorted(filenames):
            if name.startswith("."):
                skipped.append(base + name)
            else:
                names.append(name)
        yield base, rel_dir, names


def iter_input(path: str, opts: ConvertOptions, keys: KeyAllocator,
               skipped: list[str], exclude: str | None = None) -> Iterator[Item]:
    """The items of one command-line input (``exclude``: a folder never read, the output)."""
    p = Path(path)
    kind = detect_kind(path, opts.kind)
    prefix = sanitize_segment(strip_ext(p.resolve().name)) if not p.is_dir() else \
        sanitize_segment(p.resolve().name)
    if p.is_dir() and kind != "hf":
        # keys as path_key(prefix, rel) gives them, the folder's part sanitized once per folder
        take = keys.take
        for base, rel_dir, names in walk_dirs(p, skipped, exclude):
            key_dir = "/".join(map(sanitize_segment, [prefix] + [d for d in rel_dir.split("/")
                                                                 if d]))
            for name in names:
                f = base + name
                stem, dot, ext = name.rpartition(".")  # strip_ext and the extension at once
                if not dot:
                    stem, ext = name, ""
                elif not stem:
                    stem = name
                key = f"{key_dir}/{sanitize_segment(stem)}"
                if len(key) > MAX_KEY_CHARS:
                    key = fit_key(key, rel_dir + name)
                if kind != "dir":
                    fkind = kind
                else:  # file_kind(f), images and audio by the extension of the name at hand
                    ext = ext.lower()
                    fkind = "images" if ext in IMAGE_EXTS else "audio" if ext in AUDIO_EXTS \
                        else file_kind(f)
                if fkind in _ONE_FILE:  # most files: iter_file inlined
                    how = _ONE_FILE[fkind]
                    yield Item(f, take(key, f), [Part(how, how, f)])
                else:
                    yield from iter_file(f, fkind, key, opts, keys, skipped)
        return
    if not p.exists():
        yield Item(path, error="does not exist")
        return
    yield from iter_file(path, kind, path_key("", prefix), opts, keys, skipped)


_ONE_FILE = {"images": "image", "audio": "audio"}  # kinds of one sample per file, their builder


def iter_file(path: str, kind: str, key: str, opts: ConvertOptions, keys: KeyAllocator,
              skipped: list[str]) -> Iterator[Item]:
    """The items of one file of a known kind; ``key`` is its key (or key base)."""
    if kind in ("images", "audio"):
        how = "image" if kind == "images" else "audio"
        yield Item(path, keys.take(key, path), [Part(how, how, path)])
    elif kind == "text":
        yield from text_items(path, key, opts, keys)
    elif kind in ("jsonl", "manifest", "jsonl_or_manifest"):
        if kind == "jsonl_or_manifest":
            kind = "manifest" if is_sample_manifest(path) else "jsonl"
        yield from (manifest_items if kind == "manifest" else jsonl_items)(path, key, opts, keys)
    elif kind in ("wds", "hf", "parquet"):
        from .convert_sources_ext import EXT_SOURCES

        yield from EXT_SOURCES[kind](path, key, opts, keys, skipped)
    else:
        yield Item(path, error=f"unsupported file type '.{ext_of(path)}' (use --kind to force one)")


def read_text(path: str, opts: ConvertOptions) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for a whole text file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    if not data:
        return None, "empty file (0 bytes)"
    try:
        return data.decode("utf-8", errors=opts.text_errors), None
    except UnicodeDecodeError as e:
        return None, (f"not UTF-8 text ({e.reason} at byte {e.start}); use --text-errors "
                      "replace to keep it")


def split_text(text: str, spec: str) -> list[str]:
    """Passages of ``text`` by ``lines``, ``paragraphs`` (blank-line separated) or ``chars:N``."""
    how, n = parse_text_split(spec)
    if how == "lines":
        return [ln for ln in text.splitlines() if ln.strip()]
    if how == "paragraphs":
        return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    return [text[i:i + n] for i in range(0, len(text), n)]


def text_items(path: str, key: str, opts: ConvertOptions, keys: KeyAllocator) -> Iterator[Item]:
    text, err = read_text(path, opts)
    if err is not None:
        yield Item(path, error=err)
        return
    for i, passage in enumerate(split_text(text, opts.text_split)):
        k = keys.take(f"{key}/{i:06d}", f"{path}#{i}")
        yield Item(f"{path}#{i}", k, [Part("text", "text", text=passage)])


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def jsonl_items(path: str, key: str, opts: ConvertOptions, keys: KeyAllocator) -> Iterator[Item]:
    """One text block per line of a JSONL file, from field ``opts.text_field``."""
    try:
        for n, line in _lines(path):
            src = f"{path}:{n}"
            try:
                obj = json.loads(line.decode("utf-8", errors=opts.text_errors))
                text = obj[opts.text_field]
                if not isinstance(text, str):
                    raise TypeError
            except (UnicodeDecodeError, ValueError) as e:
                yield Item(src, error=f"line {n}: not valid JSON: {e}")
                continue
            except (KeyError, TypeError):
                yield Item(src, error=f"line {n}: no string field {opts.text_field!r}")
                continue
            yield Item(src, keys.take(f"{key}/{n:06d}", src), [Part("text", "text", text=text)])
    except OSError as e:
        yield Item(path, error=f"unreadable: {e.strerror}")


def manifest_items(path: str, key: str, opts: ConvertOptions,
                   keys: KeyAllocator) -> Iterator[Item]:
    """One sample per line: a list of blocks, or ``{"key": ..., "blocks": [...]}``; each block
    ``{"mode", "path"}`` (relative to the manifest, or to ``--manifest-root``) or
    ``{"mode", "text"}``, optional ``meta``. Paths may not climb out of that folder."""
    root = opts.manifest_root if opts.manifest_root is not None else Path(path).parent
    base = Path(os.path.abspath(root))
    try:
        for n, line in _lines(path):
            src = f"{path}:{n}"
            try:
                k, parts = parse_manifest_line(line, base, opts)
                k = check_key(k) if k is not None else f"{key}/{n:06d}"
            except (ValueError, FormatError) as e:
                yield Item(src, error=f"line {n}: {e}")
                continue
            yield Item(src, keys.take(k, src), parts)
    except OSError as e:
        yield Item(path, error=f"unreadable: {e.strerror}")


def parse_manifest_line(line: bytes, base: Path, opts: ConvertOptions) -> tuple[str | None,
                                                                               list[Part]]:
    """(key or None, parts) of one manifest line; ValueError says what is wrong."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    key = None
    if isinstance(obj, dict):
        key = obj.get("key")
        if key is not None and not isinstance(key, str):
            raise ValueError("'key' must be a string")
        obj = obj.get("blocks")
    if not isinstance(obj, list) or not obj:
        raise ValueError("expected a non-empty list of blocks")
    parts = []
    for i, b in enumerate(obj):
        if not isinstance(b, dict) or not isinstance(b.get("mode"), str):
            raise ValueError(f"block {i}: expected an object with a 'mode'")
        mode, meta = b["mode"], b.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"block {i}: 'meta' must be an object")
        if isinstance(b.get("text"), str):
            parts.append(Part("text", mode, text=b["text"], meta=meta))
            continue
        rel = b.get("path")
        if not isinstance(rel, str) or not rel:
            raise ValueError(f"block {i}: needs a 'path' or a 'text'")
        full = resolve_inside(base, rel)
        how = mode if mode in ("image", "audio", "text") else (how_for_ext(ext_of(rel)) or "auto")
        parts.append(Part(how, mode, str(full), text_errors=opts.text_errors, meta=meta))
    return key, parts


def resolve_inside(base: Path, rel: str) -> Path:
    """``rel`` under ``base``; ValueError if absolute, escaping ``base``, or missing.

    The check is on the path as written (``..`` may not climb out): a symlink inside ``base`` is
    the folder owner's choice and is followed, a manifest line is not trusted to pick files."""
    if os.path.isabs(rel) or rel.startswith("~"):
        raise ValueError(f"path {rel!r} is absolute; paths are relative to the manifest's folder")
    full = Path(os.path.normpath(base / rel))
    if os.path.commonpath([str(full), str(base)]) != str(base) or full == base:
        raise ValueError(f"path {rel!r} escapes the manifest's folder")
    if not full.exists():
        raise ValueError(f"path {rel!r} does not exist")
    return full

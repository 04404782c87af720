"""Sources over container formats: WebDataset tar shards, Hugging Face ``save_to_disk`` folders
and parquet files.

- WebDataset: members are grouped into samples by the usual rule (the name up to the first dot of
  its base name is the key, the rest is the extension); each member becomes a block, mode by
  extension (image, audio, text for ``txt``/``json``/``cls``/captions, ``data`` otherwise) with
  ``meta.ext``. Workers read members by byte range, so only uncompressed ``.tar`` is supported.
- Hugging Face / parquet: ``Image`` columns become image blocks, ``Audio`` columns audio blocks,
  string columns text blocks (``meta.column`` names the column); other columns are listed as
  skipped. Without Hugging Face feature metadata, binary columns are sniffed (image, else audio).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator

from .convert_items import Item, Part, how_for_ext
from .convert_keys import KeyAllocator, path_key, sanitize_segment
from .convert_options import ConvertOptions

WDS_TEXT = {"txt", "text", "json", "cls", "cls2", "caption", "transcript", "md"}


def _wds_part(path: str, m: tarfile.TarInfo, ext: str) -> Part:
    last = ext.rpartition(".")[2].lower()
    how = "text" if last in WDS_TEXT else (how_for_ext(last) or "bytes")
    mode = {"image": "image", "audio": "audio", "text": "text"}.get(how, "data")
    return Part(how, mode, path, offset=m.offset_data, size=m.size, meta={"ext": ext})


def wds_items(path: str, key: str, opts: ConvertOptions, keys: KeyAllocator,
              skipped: list[str] | None = None) -> Iterator[Item]:
    """One item per WebDataset sample (consecutive members sharing a key)."""
    try:
        tf = tarfile.open(path, "r:")  # uncompressed only: workers read by offset
    except (OSError, tarfile.TarError) as e:
        yield Item(path, error=f"not a readable uncompressed tar: {e}")
        return
    cur_key, parts = None, []
    prefix = key
    try:
        with tf:
            for m in tf:
                if not m.isfile():
                    yield Item(f"{path}:{m.name}", error="tar member is not a regular file")
                    continue
                dirname, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                wkey = f"{dirname}/{stem}" if dirname else stem
                if cur_key is not None and wkey != cur_key:
                    yield _wds_item(path, prefix, cur_key, parts, keys)
                    parts = []
                cur_key = wkey
                parts.append(_wds_part(path, m, ext if dot else "bin"))
    except tarfile.TarError as e:
        yield Item(path, error=f"tar is corrupt after {cur_key!r}: {e}")
    if cur_key is not None and parts:
        yield _wds_item(path, prefix, cur_key, parts, keys)


def _wds_item(path: str, prefix: str, wkey: str, parts: list[Part], keys: KeyAllocator) -> Item:
    src = f"{path}:{wkey}"
    return Item(src, keys.take(path_key(prefix, wkey.replace(".", "_")), src), parts)


def _feature_kinds(features: dict) -> dict[str, str]:
    """column -> image / audio / text / skip, from Hugging Face feature JSON."""
    out = {}
    for col, f in features.items():
        t = f.get("_type") if isinstance(f, dict) else None
        if t in ("Image", "Audio"):
            out[col] = t.lower()
        elif t == "Value" and f.get("dtype") in ("string", "large_string"):
            out[col] = "text"
        else:
            out[col] = "skip"
    return out


def _arrow_kinds(schema) -> dict[str, str]:
    import pyarrow as pa

    out = {}
    for field in schema:
        t = field.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            out[field.name] = "text"
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
                pa.types.is_struct(t) and t.get_field_index("bytes") >= 0):
            out[field.name] = "auto"
        else:
            out[field.name] = "skip"
    return out


def _row_items(src_base: str, key: str, batches, kinds: dict[str, str], opts: ConvertOptions,
               keys: KeyAllocator, skipped: list[str]) -> Iterator[Item]:
    cols = [c for c, k in kinds.items() if k != "skip"]
    skipped.extend(f"{src_base}: column {c!r} ({k}) is not a block type" for c, k in kinds.items()
                   if k == "skip")
    row = 0
    for batch in batches:
        data = {c: batch.column(c).to_pylist() for c in cols}
        for i in range(batch.num_rows):
            src = f"{src_base}#{row}"
            parts, err = [], None
            for c in cols:
                v, how = data[c][i], kinds[c]
                meta = {"column": c}
                if v is None:
                    err = f"column {c!r} is null"
                    break
                if how == "text":
                    parts.append(Part("text", "text", text=v, meta=meta))
                    continue
                raw, fpath = (v.get("bytes"), v.get("path")) if isinstance(v, dict) else (v, None)
                mode = how if how != "auto" else "auto"
                if raw is not None:
                    parts.append(Part(how, mode, data=raw, meta=meta))
                elif fpath:
                    parts.append(Part(how, mode, fpath, meta=meta))
                else:
                    err = f"column {c!r} has neither bytes nor a path"
                    break
            if err or not parts:
                yield Item(src, error=err or "no block columns")
            else:
                yield Item(src, keys.take(f"{key}/{row:06d}", src), parts)
            row += 1


def hf_items(path: str, key: str, opts: ConvertOptions, keys: KeyAllocator,
             skipped: list[str] | None = None) -> Iterator[Item]:
    """Rows of a ``save_to_disk`` Dataset (or every split of a DatasetDict, sorted)."""
    import datasets

    skipped = [] if skipped is None else skipped
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises many types for unreadable folders
        yield Item(path, error=f"not a readable Hugging Face dataset: {e}")
        return
    splits = sorted(ds.items()) if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for name, d in splits:
        kinds = _feature_kinds(d.features.to_dict())
        k = f"{key}/{sanitize_segment(name)}" if name else key
        yield from _row_items(f"{path}{'/' + name if name else ''}", k,
                              d.data.table.to_batches(max_chunksize=256), kinds, opts, keys,
                              skipped)


def parquet_items(path: str, key: str, opts: ConvertOptions, keys: KeyAllocator,
                  skipped: list[str] | None = None) -> Iterator[Item]:
    """Rows of a parquet file; column kinds from its Hugging Face metadata when present."""
    import pyarrow.parquet as pq

    skipped = [] if skipped is None else skipped
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        yield Item(path, error=f"not a readable parquet file: {e}")
        return
    meta = pf.schema_arrow.metadata or {}
    kinds = _arrow_kinds(pf.schema_arrow)
    if b"huggingface" in meta:
        try:
            feats = json.loads(meta[b"huggingface"])["info"]["features"]
            kinds = _feature_kinds(feats)
        except (ValueError, KeyError, TypeError):
            pass
    yield from _row_items(path, key, pf.iter_batches(batch_size=256), kinds, opts, keys, skipped)


EXT_SOURCES = {"wds": wds_items, "hf": hf_items, "parquet": parquet_items}

"""``--set key=value`` overrides of nested config dataclasses, with values typed by the field."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any


class OverrideError(ValueError):
    """An override names no field, or its value does not fit the field's type."""


def _coerce(text: str, typ: Any, path: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        last: Exception | None = None
        for a in args:
            try:
                return _coerce(text, a, path)
            except OverrideError as e:
                last = e
        raise last or OverrideError(f"{path}: cannot parse {text!r}")
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise OverrideError(f"{path}: expected a boolean (true/false), got {text!r}")
    if typ in (int, float, str):
        try:
            return typ(text)
        except ValueError:
            raise OverrideError(f"{path}: expected {typ.__name__}, got {text!r}") from None
    if origin in (dict, list, tuple) or typ in (dict, list, tuple):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise OverrideError(f"{path}: expected JSON for a {typ}, got {text!r}") from None
        return tuple(value) if (origin is tuple or typ is tuple) else value
    raise OverrideError(f"{path}: fields of type {typ} cannot be set from the command line")


def apply_override(cfg: Any, assignment: str) -> None:
    """Apply one ``a.b.c=value`` to a tree of dataclasses (and dicts of dataclasses), in place.

    Example: ``apply_override(run, "model.decoder.layers=4")``.
    """
    if "=" not in assignment:
        raise OverrideError(f"override {assignment!r} must look like key=value")
    path, text = assignment.split("=", 1)
    parts = path.strip().split(".")
    node = cfg
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i + 1])
        if isinstance(node, dict):
            if name not in node:
                raise OverrideError(f"{where}: no such key (known: {sorted(node)})")
            if last:
                raise OverrideError(f"{where}: set a field inside it, e.g. {where}.FIELD=...")
            node = node[name]
            continue
        if not dataclasses.is_dataclass(node):
            raise OverrideError(f"{where}: {type(node).__name__} has no fields")
        fields = {f.name: f for f in dataclasses.fields(node)}
        if name not in fields:
            raise OverrideError(f"{where}: no such field (known: {sorted(fields)})")
        if last:
            hints = typing.get_type_hints(type(node))
            setattr(node, name, _coerce(text.strip(), hints[name], where))
        else:
            node = getattr(node, name)

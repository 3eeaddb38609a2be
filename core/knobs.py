"""Typed-config machinery: knobs with validation metadata, building frozen dataclasses from plain
mappings with errors that name the dotted key. ``core.config`` declares the project's sections with it.

A field may carry metadata:

* ``range=(lo, hi)`` inclusive bounds for numbers (``None`` = unbounded), ``choices=(...)`` the allowed
  values of a string, ``doc="..."`` a one-line description (shown in errors),
* ``operational=True`` for knobs that change how a stage runs, not its result (:func:`result_params`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A bad value in params.yaml; the message names the dotted key."""


def knob(default: Any, *, range: tuple | None = None, choices: tuple | None = None,
         doc: str = "", operational: bool = False) -> Any:
    """A dataclass field with validation metadata. ``operational``: the knob changes how a stage runs
    (processes, threads, device, logging, checkpoints) but not what it computes, so it is not a DVC
    params dep, not part of a resume fingerprint and not recorded in cached outputs."""
    meta = {"range": range, "choices": choices, "doc": doc, "operational": operational}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# a knob of this type may be "auto": resolved from the images' size by core.sizing when a stage starts
AUTO = "auto"
Auto = typing.Literal["auto"]

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, meta: dict | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"params key '{key}' must be a mapping, got {type(value).__name__}")
        return build(tp, value, key)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"params key '{key}' must be {' or '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, meta)
            except ConfigError as e:
                errors.append(str(e))
        if Auto in args and isinstance(value, str):   # a misspelled auto, not a malformed number
            what = {int: "an integer", float: "a number"}.get(args[0], "a list")
            raise ConfigError(f"params key '{key}' must be {what} or 'auto', got {value!r}")
        raise ConfigError(errors[0] if errors else f"params key '{key}' is invalid")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"params key '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"params key '{key}' must be a mapping, got {value!r}")
        return {str(k): _convert(v, args[1] if args else Any, f"{key}.{k}", None) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"params key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params key '{key}' must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"params key '{key}' must be a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"params key '{key}' must be a string, got {value!r}")
    else:
        raise ConfigError(f"params key '{key}': unsupported type {_type_name(tp)}")
    meta = meta or {}
    rng = meta.get("range")
    if rng is not None:
        lo, hi = rng
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"params key '{key}' = {value!r} is out of range {bounds}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"params key '{key}' = {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def build(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, validating every key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise ConfigError(
            f"unknown params key {where}; known keys{' of ' + repr(prefix) if prefix else ''}: "
            f"{', '.join(sorted(known))}")
    kwargs = {}
    for name, f in known.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key, dict(f.metadata))
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-python view of a config (for metadata and logs)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def is_operational(cls: type, name: str) -> bool:
    """Whether field ``name`` of config dataclass ``cls`` is an operational knob."""
    return bool({f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("operational"))


def result_params(obj: Any) -> dict:
    """``to_dict`` of a config section without its operational knobs: what its result depends on."""
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if not f.metadata.get("operational")}

"""Params overrides ``section.key=value`` or ``key=value`` for a top-level key such as ``seed`` (values in
YAML syntax): the one parser of the benches and variant runs. Overrides may only set keys that exist, and
never a whole section, so a typo or a missing section fails naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import yaml

from core.config import ConfigError


def parse_assignment(item: str) -> tuple[list[str], Any]:
    """``"train_cls.tau=0.3"`` -> ``(["train_cls", "tau"], 0.3)``; ``"seed=1"`` -> ``(["seed"], 1)``."""
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or not all(key.split(".")):
        raise ConfigError(f"override {item!r}: expected section.key=value (or key=value for a top-level key "
                          "such as seed)")
    return key.split("."), yaml.safe_load(value)


def parse_assignments(spec: str) -> list[tuple[list[str], Any]]:
    """A comma-separated list of assignments (``"a.b=1,c.d=[1, 2]"`` is not split inside brackets)."""
    items, depth, current = [], 0, ""
    for ch in spec:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [parse_assignment(item) for item in items if item.strip()]


def apply_overrides(params: dict, sets: Iterable[tuple[list[str], Any]]) -> dict:
    """Set each ``(path, value)`` in the params mapping (in place; returned); unknown keys are refused."""
    for path, value in sets:
        node = params
        for depth, part in enumerate(path[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"params has no section '{'.'.join(path[:depth + 1])}'")
            node = node[part]
        if path[-1] not in node:
            raise ConfigError(f"params has no key '{'.'.join(path)}'")
        if isinstance(node[path[-1]], dict):
            raise ConfigError(f"params key '{'.'.join(path)}' is a section: set one of its keys "
                              f"({'.'.join(path)}.<key>=value)")
        node[path[-1]] = value
    return params


def check_overrides(params_path: str | Path, overrides: dict[str, Any]) -> dict:
    """The params file with ``{"section.key": value}`` applied, validated before anything runs: an
    unknown key, a wrong type or a value out of range is a :class:`ConfigError` naming the key. The
    project's own params are checked with the typed config; another project's only for the keys' existence."""
    from core.config import Params, build

    path = Path(params_path)
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    sets = []
    for key, value in overrides.items():
        if not isinstance(key, str) or not all(key.split(".")):
            raise ConfigError(f"override {key!r}: expected a params key such as train_cls.tau or seed")
        sets.append((key.split("."), value))
    params = apply_overrides(params, sets)
    if set(params) <= {f.name for f in dataclasses.fields(Params)}:
        build(Params, params)
    return params

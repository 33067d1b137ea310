"""Configs to JSON and back, and `--set dotted.path=value` overrides: the one serializer of the package.

Works on any (nested) frozen dataclass by its type hints; imports nothing else of moalign.
"""

from __future__ import annotations

import ast
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any


def to_dict(cfg: Any) -> Any:
    """A JSON-able dict of a (nested) config dataclass; tuples become lists."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from `to_dict` output (unknown keys are an error: a config from elsewhere)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {name: _coerce(hints[name], value) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    """Convert a JSON/literal value to the annotated field type (nested dataclasses, tuples, optionals)."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        last_err: Exception | None = None
        for arg in args:
            try:
                return _coerce(arg, value)
            except (TypeError, ValueError) as err:
                last_err = err
        raise ValueError(f"cannot read {value!r} as {tp}") from last_err
    if is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value)
        raise ValueError(f"expected a mapping for {tp.__name__}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]  # "bounce, roll" too
        elif not isinstance(value, list | tuple):
            value = [value]  # `--layers 17` is the one-element tuple (17,)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} values for {tp}, got {value!r}")
        return tuple(_coerce(a, v) for a, v in zip(args, value, strict=True))
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return tp(value)
    if tp is typing.Any:
        return value
    return value


def _parse_literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `dotted.path=value` overrides to a frozen config, e.g. `encoder.layer=5`, `data.fps=8`.

    Values are Python literals (numbers, True/False, None, tuples like 64,64) or plain strings. All overrides
    are applied before the configs check themselves, so their order does not matter (validate_every and
    validation_prompts may come in either order).
    """
    if not overrides:
        return cfg
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. --set lr=3e-4)")
        path, raw = item.split("=", 1)
        _set_path(type(cfg), data, path.strip().split("."), _parse_literal(raw.strip()), path)
    return from_dict(type(cfg), data)


def _set_path(cls: type, data: dict, keys: list[str], value: Any, full: str) -> None:
    """Set `value` (coerced to the field's type) at the dotted `keys` of a config dict of class `cls`."""
    names = {f.name for f in fields(cls)}
    key = keys[0]
    if key not in names:
        raise ValueError(f"unknown config field {full!r}: {cls.__name__} has {', '.join(sorted(names))}")
    tp = typing.get_type_hints(cls)[key]
    if len(keys) == 1:
        data[key] = to_dict(_coerce(tp, value))
        return
    if not is_dataclass(tp) or not isinstance(data.get(key), dict):
        raise ValueError(f"config field {'.'.join(full.split('.')[: -len(keys) + 1])!r} has no sub-fields")
    _set_path(tp, data[key], keys[1:], value, full)

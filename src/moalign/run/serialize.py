"""Configs to JSON and back, and `--set dotted.path=value` overrides: the one serializer of the package.

Works on any (nested) frozen dataclass by its type hints; imports nothing else of moalign.
"""

from __future__ import annotations

import ast
import difflib
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
    unknown = sorted(set(data) - known)
    if unknown:
        hints_text = "; ".join(f"{k!r}: {did_you_mean(cls, k)}" for k in unknown)
        raise ValueError(f"unknown {cls.__name__} fields {hints_text}")
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
        if isinstance(value, str) and args and args[0] is str:
            value = [value]  # a string is one string, commas and all: several come as a list ["a, b", "c"]
        elif isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]  # numbers: "8, 17" too
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

    Values are Python literals (numbers, True/False, None, tuples like 64,64, lists like ["a, b", "c"]) or plain
    strings; a string is never split on commas (a tuple of strings takes a list, or one string). All overrides
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
        _set_path(
            type(cfg), data, path.strip().split("."), _parse_literal(raw.strip()), path.strip(), type(cfg)
        )
    return from_dict(type(cfg), data)


def _set_path(cls: type, data: dict, keys: list[str], value: Any, full: str, root: type) -> None:
    """Set `value` (coerced to the field's type) at the dotted `keys` of a config dict of class `cls` (a part of
    `root`, whose field paths an unknown key's hint names)."""
    names = {f.name for f in fields(cls)}
    key = keys[0]
    if key not in names:
        raise ValueError(f"unknown config field {full!r}: {did_you_mean(root, full)}")
    tp = typing.get_type_hints(cls)[key]
    if len(keys) == 1:
        try:
            data[key] = to_dict(_coerce(tp, value))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{full}={value!r}: {err}") from err
        return
    if not is_dataclass(tp) or not isinstance(data.get(key), dict):
        raise ValueError(f"config field {'.'.join(full.split('.')[: -len(keys) + 1])!r} has no sub-fields")
    _set_path(tp, data[key], keys[1:], value, full, root)


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted field path of a config dataclass ("lr", "align.tau", "align.projector.hidden_dim", ...)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        path = prefix + f.name
        out.append(path)
        if is_dataclass(hints[f.name]):
            out.extend(field_paths(hints[f.name], path + "."))
    return out


# names other trainers (the diffusers examples, finetrainers) use for our fields
ALIASES = {
    "learning_rate": "lr", "train_batch_size": "batch_size", "max_train_steps": "steps", "rank": "lora_rank",
    "checkpointing_steps": "checkpoint_every", "checkpoints_total_limit": "checkpoint_limit",
    "validation_prompt": "validation_prompts", "lambda": "align.lam",
    "layer": "align.layers", "lr_warmup_steps": "warmup_steps", "max_grad_norm": "grad_clip",
}  # fmt: skip


def did_you_mean(cls: type, path: str) -> str:
    """A hint for an unknown dotted `path` of `cls`: the closest field paths (a field of a sub-config given
    without its prefix is found too: "tau" -> "align.tau"; other trainers' names: "learning_rate" -> "lr"),
    else what the config says about that name (`unknown_field_hints`), else its top-level fields."""
    paths = field_paths(cls)
    leaf = path.rsplit(".", 1)[-1]

    def score(candidate: str) -> float:
        full = difflib.SequenceMatcher(None, path, candidate).ratio()
        return max(full, difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1]).ratio())

    close = [ALIASES[leaf]] if ALIASES.get(leaf) in paths and ALIASES[leaf] != path else []
    close += sorted((p for p in paths if score(p) >= 0.75 and p not in close), key=score, reverse=True)
    note = getattr(cls, "unknown_field_hints", {}).get(path.split(".", 1)[0])
    if note:
        return note
    if close:
        return f"did you mean {' or '.join(close[:3])}?"
    return f"{cls.__name__} has {', '.join(f.name for f in fields(cls))}"

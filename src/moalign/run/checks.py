"""The settings every training loop shares, checked when a config is built: before any model loads, one line
each (the CLI turns the ValueError into exit 2).

A zero or negative step count used to save an untrained model as finished, a NaN learning rate trained NaN
weights, a zero log or checkpoint interval divided by zero mid-run: each is refused here, naming the field, its
value and what it must be.
"""

from __future__ import annotations

import math
from typing import Any

from moalign.run.choices import MIXED_PRECISION

# field -> what it must be; checked on every config that has the field
_AT_LEAST_ONE = (
    "steps", "batch_size", "log_every", "checkpoint_every", "checkpoint_limit", "val_every",
    "gradient_accumulation_steps", "vae_steps", "vae_batch_size",
)  # fmt: skip
_NOT_NEGATIVE_INT = ("warmup_steps", "validate_every", "vae_warmup_steps", "stats_clips", "probe_clips")
_POSITIVE = ("lr", "vae_lr")
_NOT_NEGATIVE = ("weight_decay", "grad_clip", "vae_grad_clip")


def check_training_fields(cfg: Any) -> None:
    """Refuse a training config whose shared fields are out of range (those it has of: steps, batch sizes,
    intervals >= 1; warm-up and counts >= 0; learning rates finite and > 0; weight decay and gradient clip finite
    and >= 0; mixed_precision one of accelerate's "no", "fp16", "bf16").

    Raises:
        ValueError: naming the field, its value and its valid range.
    """
    for name in _AT_LEAST_ONE:
        value = getattr(cfg, name, None)
        if value is not None and not (_is_int(value) and value >= 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    for name in _NOT_NEGATIVE_INT:
        value = getattr(cfg, name, None)
        if value is not None and not (_is_int(value) and value >= 0):
            raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    for name in _POSITIVE:
        value = getattr(cfg, name, None)
        if value is not None and not (_is_real(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    for name in _NOT_NEGATIVE:
        value = getattr(cfg, name, None)
        if value is not None and not (_is_real(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0 (0: none), got {value!r}")
    precision = getattr(cfg, "mixed_precision", None)
    if precision is not None and precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {precision!r}")


def check_real(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    """Refuse a number that is not finite or lies outside [low, high] ((low, high] with `open_low`).

    Raises:
        ValueError: naming the field, its value and the range.
    """
    inside = _is_real(value) and (value > low if open_low else value >= low) and value <= high
    if not inside:
        bracket = "(" if open_low else "["
        top = "inf)" if math.isinf(high) else f"{high:g}]"
        raise ValueError(f"{name} must be a finite number in {bracket}{low:g}, {top}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

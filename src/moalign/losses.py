"""Losses as pure functions of tensors, each returning its named, unweighted parts (always float32).

Weights such as lambda are applied in exactly one place: the training loop of the stage that uses them.
"""

from __future__ import annotations

import torch


class LossParts(dict):
    """A mapping of named loss parts (0-d float32 tensors) that also allows attribute access: `parts.total`."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no loss part {name!r}; parts: {sorted(self)}") from None

    def scalars(self) -> dict[str, float]:
        """Detached Python floats of every part, for logging."""
        return {k: float(v.detach()) for k, v in self.items()}


FLOW_LOSSES = ("l1", "huber", "l2")


def flow_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    kind: str = "l1",
    huber_delta: float = 1.0,
) -> LossParts:
    """Stage-1 flow supervision (paper Sec. 3.1: L1), with EPE for logging.

    Args:
        pred: (B, P, h, w, 2) predicted flow, pixels at (h, w), x then y.
        target: (B, P, h, w, 2) target flow at the same resolution and scale.
        valid: optional (B, P, h, w) mask of pixels that count; all count when None.
        kind: the trained objective: "l1" (the paper), "huber" (quadratic below `huber_delta` px, L1 above;
            escapes the all-zero plateau L1 sits on when most pixels are static), or "l2".
        huber_delta: the Huber threshold in pixels of (h, w).

    Returns:
        LossParts with `l1` (mean absolute error per flow component), `epe` (mean end-point error, px),
        `total` (the objective chosen by `kind`; equals `l1` for "l1"), and `huber` / `l2` when chosen.
    """
    if kind not in FLOW_LOSSES:
        raise ValueError(f"unknown flow loss {kind!r}; valid: {', '.join(FLOW_LOSSES)}")
    pred, target = pred.float(), target.float()
    diff = pred - target  # (B, P, h, w, 2)
    per_pixel = {"l1": diff.abs().mean(-1), "epe": diff.norm(dim=-1)}  # each (B, P, h, w)
    if kind == "huber":
        a = diff.abs()
        per_pixel["huber"] = torch.where(
            a < huber_delta, 0.5 * a.square() / huber_delta, a - 0.5 * huber_delta
        ).mean(-1)
    elif kind == "l2":
        per_pixel["l2"] = diff.square().mean(-1)
    if valid is None:
        parts = {k: v.mean() for k, v in per_pixel.items()}
    else:
        weight = valid.float()
        denom = weight.sum().clamp_min(1.0)
        parts = {k: (v * weight).sum() / denom for k, v in per_pixel.items()}
    return LossParts(**parts, total=parts[kind])


def end_point_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean end-point error in pixels: mean over all leading dims of ||pred - target||_2. (..., 2) -> 0-d."""
    return (pred.float() - target.float()).norm(dim=-1).mean()

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


def flow_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> LossParts:
    """Stage-1 flow supervision: L1 between predicted and target flow (paper Sec. 3.1), plus EPE for logging.

    Args:
        pred: (B, P, h, w, 2) predicted flow, pixels at (h, w), x then y.
        target: (B, P, h, w, 2) target flow at the same resolution and scale.
        valid: optional (B, P, h, w) mask of pixels that count; all count when None.

    Returns:
        LossParts with `l1` (mean absolute error per flow component), `epe` (mean end-point error, px, not
        differentiated for training but with its graph), and `total` (= l1, the trained objective).
    """
    pred, target = pred.float(), target.float()
    diff = pred - target  # (B, P, h, w, 2)
    l1 = diff.abs().mean(-1)  # (B, P, h, w)
    epe = diff.norm(dim=-1)
    if valid is None:
        l1_mean, epe_mean = l1.mean(), epe.mean()
    else:
        weight = valid.float()
        denom = weight.sum().clamp_min(1.0)
        l1_mean, epe_mean = (l1 * weight).sum() / denom, (epe * weight).sum() / denom
    return LossParts(l1=l1_mean, epe=epe_mean, total=l1_mean)


def end_point_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean end-point error in pixels: mean over all leading dims of ||pred - target||_2. (..., 2) -> 0-d."""
    return (pred.float() - target.float()).norm(dim=-1).mean()

"""Losses as pure functions of tensors, each returning its named, unweighted parts (always float32).

Weights such as lambda are applied in exactly one place: the training loop of the stage that uses them.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch


class LossParts(OrderedDict):
    """A mapping of named loss parts (0-d float32 tensors) that also allows attribute access: `parts.total`.

    An OrderedDict, because wrappers that rebuild a model's outputs (torch's FSDP, DDP) keep the class of an
    OrderedDict but turn any other dict subclass into a plain dict.
    """

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


# ---- stage-2 alignment losses (paper Sec. 3.2; VideoREPA's TRD; REPA) -----------------------------------------
#
# Memory. The relation matrices are never built whole: the losses walk over blocks of at most `block` x N
# token pairs, and each block runs under activation checkpointing, so the forward keeps only a scalar per
# block and the backward recomputes one block at a time. Peak extra memory is a few (B, block, N) tensors
# whatever the number of frames; the result equals the full-matrix formula to float32 precision.


def _hinge(x: torch.Tensor, margin: float) -> torch.Tensor:
    """h(x) = relu(x - margin): differences below the margin cost nothing (VideoREPA's TRD uses 0.1)."""
    return torch.relu(x - margin) if margin > 0 else x


def _relation_gap_sum(zs_a, zs_b, zt_a, zt_b, margin: float) -> torch.Tensor:
    """Sum over one block of h(|S_s - S_t|), S = a @ b^T per sample: (B, n, D) x2 per side -> (B,)."""
    s_student = zs_a @ zs_b.transpose(-1, -2)  # (B, n, m)
    s_teacher = zt_a @ zt_b.transpose(-1, -2)
    return _hinge((s_student - s_teacher).abs(), margin).sum(dim=(-1, -2))


def _block_gap_sum(zs_a, zs_b, zt_a, zt_b, margin: float) -> torch.Tensor:
    if torch.is_grad_enabled() and (zs_a.requires_grad or zs_b.requires_grad):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(_relation_gap_sum, zs_a, zs_b, zt_a, zt_b, margin, use_reentrant=False)
    return _relation_gap_sum(zs_a, zs_b, zt_a, zt_b, margin)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-12)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, ndim: int, what: str) -> None:
    if student.ndim != ndim or teacher.ndim != ndim or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be "
            f"{ndim}-d with equal leading dims (widths may differ)"
        )


def soft_relational_loss(
    student: torch.Tensor, teacher: torch.Tensor, tau: float = 10.0, margin: float = 0.0, block: int = 1024
) -> LossParts:
    """MoAlign's soft relational alignment: within-frame (spatial) and temporally weighted cross-frame terms.

    Tokens are L2-normalised; S is the cosine-similarity matrix; h(x) = relu(x - margin).
    spatial  = mean over batch and frames f of mean over all N x N entries of h(|S_s(f, f) - S_t(f, f)|).
    temporal = per sample, sum over f != g and all (i, j) of W_fg h(|S_s(f, g) - S_t(f, g)|) divided by the
               sum of W_fg over the same entries, W_fg = exp(-|f - g| / tau); then the mean over the batch
               (0 with one frame).
    total    = spatial + temporal.

    Args:
        student: (B, F, N, D_s) projected transformer tokens, frame-major (N tokens per frame).
        teacher: (B, F, N, D_t) motion (or encoder) tokens on the same grid; widths may differ.
        tau: temporal decay of the cross-frame weights (paper: 10).
        margin: hinge margin m (MoAlign: 0; VideoREPA: 0.1).
        block: rows of a relation block (memory knob; does not change the result).

    Returns:
        LossParts(spatial, temporal, total), float32 whatever the input dtype.
    """
    _check_pair(student, teacher, 4, "soft_relational_loss")
    zs, zt = _normalise(student), _normalise(teacher)  # (B, F, N, D)
    b, f, n, _ = zs.shape
    spatial = zs.new_zeros(b)
    temporal = zs.new_zeros(b)
    weight_sum = 0.0
    for fa in range(f):
        for r0 in range(0, n, block):
            rows = slice(r0, min(n, r0 + block))
            spatial = spatial + _block_gap_sum(zs[:, fa, rows], zs[:, fa], zt[:, fa, rows], zt[:, fa], margin)
            for fb in range(fa + 1, f):
                # S(f, g) = S(g, f)^T, so each unordered frame pair counts twice
                w = 2.0 * math.exp(-abs(fa - fb) / tau)
                gap = _block_gap_sum(zs[:, fa, rows], zs[:, fb], zt[:, fa, rows], zt[:, fb], margin)
                temporal = temporal + w * gap
        for fb in range(fa + 1, f):
            weight_sum += 2.0 * math.exp(-abs(fa - fb) / tau) * n * n
    spatial_mean = (spatial / (f * n * n)).mean()
    temporal_mean = (temporal / weight_sum).mean() if f > 1 else zs.new_zeros(())
    return LossParts(spatial=spatial_mean, temporal=temporal_mean, total=spatial_mean + temporal_mean)


def token_relation_distillation(
    student: torch.Tensor, teacher: torch.Tensor, margin: float = 0.1, block: int = 1024
) -> LossParts:
    """VideoREPA's token relation distillation (TRD): one relation matrix over all tokens.

    total = mean over batch and all N x N entries of h(|S_s - S_t|), S the cosine similarities of all tokens.

    Args:
        student: (B, N, D_s) tokens; teacher: (B, N, D_t); widths may differ.
        margin: hinge margin (VideoREPA: 0.1).
        block: rows of a relation block (memory knob; does not change the result).

    Returns:
        LossParts(total), float32.
    """
    _check_pair(student, teacher, 3, "token_relation_distillation")
    zs, zt = _normalise(student), _normalise(teacher)  # (B, N, D)
    n = zs.shape[1]
    acc = zs.new_zeros(zs.shape[0])
    for r0 in range(0, n, block):
        rows = slice(r0, min(n, r0 + block))
        acc = acc + _block_gap_sum(zs[:, rows], zs, zt[:, rows], zt, margin)
    total = (acc / (n * n)).mean()
    return LossParts(total=total)


def repa_loss(student: torch.Tensor, teacher: torch.Tensor) -> LossParts:
    """REPA: mean over tokens of 1 - cos(student, teacher). (..., D) x2 with equal widths -> LossParts(total)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"repa_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must match "
            "(project the student to the teacher's width first)"
        )
    total = (1.0 - (_normalise(student) * _normalise(teacher)).sum(-1)).mean()
    return LossParts(total=total)

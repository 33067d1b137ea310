"""Alignment losses against slow full-matrix references: values, margins, widths, dtypes, gradients."""

import math

import pytest
import torch

from moalign.losses import repa_loss, soft_relational_loss, token_relation_distillation


def _cos(x):
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    return x @ x.transpose(-1, -2)


def ref_soft_relational(student, teacher, tau=10.0, margin=0.0):
    """Literal reading of the definition with the full (F*N) x (F*N) matrices, in float64."""
    b, f, n, _ = student.shape
    s_s = _cos(student.reshape(b, f * n, -1))
    s_t = _cos(teacher.reshape(b, f * n, -1))
    gap = torch.relu((s_s - s_t).abs() - margin)  # (B, FN, FN)
    frame = torch.arange(f).repeat_interleave(n)
    same = frame[:, None] == frame[None, :]
    spatial = torch.stack([gap[:, frame == k][:, :, frame == k].mean(dim=(1, 2)) for k in range(f)], 1).mean()
    w = torch.exp(-(frame[:, None] - frame[None, :]).abs().double() / tau) * (~same)
    temporal = ((gap * w).sum(dim=(1, 2)) / w.sum()).mean() if f > 1 else torch.zeros((), dtype=torch.float64)
    return spatial, temporal


def ref_trd(student, teacher, margin=0.1):
    return torch.relu((_cos(student) - _cos(teacher)).abs() - margin).mean()


@pytest.mark.parametrize(("f", "n", "ds", "dt", "tau", "margin", "block"), [
    (4, 6, 8, 5, 10.0, 0.0, 1024), (3, 5, 4, 7, 2.0, 0.1, 2), (1, 7, 6, 6, 10.0, 0.05, 3), (5, 4, 3, 9, 0.5, 0.0, 1),
])  # fmt: skip
def test_soft_relational_matches_reference(f, n, ds, dt, tau, margin, block):
    torch.manual_seed(0)
    s, t = torch.randn(2, f, n, ds), torch.randn(2, f, n, dt)
    parts = soft_relational_loss(s, t, tau=tau, margin=margin, block=block)
    sp, tp = ref_soft_relational(s, t, tau, margin)
    assert parts.spatial.dtype == torch.float32
    torch.testing.assert_close(parts.spatial.double(), sp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.temporal.double(), tp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.total, parts.spatial + parts.temporal)
    if f == 1:
        assert parts.temporal == 0


@pytest.mark.parametrize(("n", "margin", "block"), [(9, 0.1, 1024), (7, 0.0, 3), (5, 0.3, 1)])
def test_trd_matches_reference(n, margin, block):
    torch.manual_seed(1)
    s, t = torch.randn(3, n, 6), torch.randn(3, n, 11)
    out = token_relation_distillation(s, t, margin=margin, block=block)
    torch.testing.assert_close(out.total.double(), ref_trd(s, t, margin), rtol=1e-5, atol=1e-6)


def test_repa_matches_reference_and_needs_equal_widths():
    torch.manual_seed(2)
    s, t = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    ref = (1 - torch.nn.functional.cosine_similarity(s.double(), t.double(), dim=-1)).mean()
    torch.testing.assert_close(repa_loss(s, t).total.double(), ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="project"):
        repa_loss(s, torch.randn(2, 10, 9))


def test_zero_for_identical_relations_and_scale_invariance():
    torch.manual_seed(3)
    s = torch.randn(2, 3, 5, 8)
    q, _ = torch.linalg.qr(torch.randn(12, 12))
    t = torch.nn.functional.pad(s, (0, 4)) @ q  # other width, same cosine structure
    parts = soft_relational_loss(s, t)
    assert parts.total.abs() < 1e-5
    assert token_relation_distillation(s.flatten(1, 2), t.flatten(1, 2)).total.abs() < 1e-6
    scale = torch.rand(2, 3, 5, 1) * 10 + 0.1  # per-token positive scaling changes nothing
    u = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(soft_relational_loss(s * scale, u).total, soft_relational_loss(s, u).total)
    torch.testing.assert_close(repa_loss(s * scale, t[..., :8]).total, repa_loss(s, t[..., :8]).total)


def test_bf16_inputs_give_float32_parts_close_to_fp32():
    torch.manual_seed(4)
    s, t = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 4)
    lo = soft_relational_loss(s.bfloat16(), t.bfloat16())
    hi = soft_relational_loss(s, t)
    assert all(v.dtype == torch.float32 for v in lo.values())
    torch.testing.assert_close(lo.total, hi.total, rtol=2e-2, atol=2e-3)
    assert (
        token_relation_distillation(s.flatten(1, 2).bfloat16(), t.flatten(1, 2)).total.dtype == torch.float32
    )


@pytest.mark.parametrize("block", [1024, 2])
def test_gradients_match_reference(block):
    torch.manual_seed(5)
    s = torch.randn(2, 3, 4, 6, dtype=torch.float32, requires_grad=True)
    t = torch.randn(2, 3, 4, 5)
    soft_relational_loss(s, t, tau=3.0, margin=0.02, block=block).total.backward()
    s64 = s.detach().double().requires_grad_(True)
    sp, tp = ref_soft_relational(s64, t, 3.0, 0.02)
    (sp + tp).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    assert not math.isnan(float(s.grad.abs().sum()))

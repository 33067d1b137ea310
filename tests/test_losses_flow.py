"""The stage-1 flow loss against hand-computed values."""

import torch

from moalign.losses import LossParts, end_point_error, flow_loss


def test_flow_loss_values():
    pred = torch.zeros(1, 1, 1, 2, 2)
    target = torch.tensor([[[[[3.0, 4.0], [0.0, 1.0]]]]])  # two pixels
    parts = flow_loss(pred, target)
    assert isinstance(parts, LossParts)
    assert torch.isclose(parts.l1, torch.tensor((3 + 4 + 0 + 1) / 4))
    assert torch.isclose(parts.epe, torch.tensor((5.0 + 1.0) / 2))
    assert parts.total is parts["total"] and torch.equal(parts.total, parts.l1)
    assert parts.scalars()["epe"] == 3.0
    assert torch.isclose(end_point_error(pred, target), torch.tensor(3.0))


def test_flow_loss_mask_and_dtype():
    pred = torch.zeros(1, 1, 1, 2, 2, dtype=torch.bfloat16, requires_grad=True)
    target = torch.tensor([[[[[3.0, 4.0], [0.0, 1.0]]]]], dtype=torch.bfloat16)
    valid = torch.tensor([[[[True, False]]]])
    parts = flow_loss(pred, target, valid)
    assert parts.total.dtype == torch.float32
    assert torch.isclose(parts.epe, torch.tensor(5.0))
    parts.total.backward()
    assert pred.grad[..., 1, :].abs().sum() == 0  # the masked pixel gets no gradient

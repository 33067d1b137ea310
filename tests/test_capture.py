"""Feature capture on tiny CogVideoX and Wan transformers: shapes, graph, checkpointing, hook removal."""

import pytest
import torch
from conftest import tiny_transformer

from moalign.capture import FeatureCapture

# smaller still than the shared tiny transformers: 3 blocks 16 wide, prompts of 6 tokens 12 wide
SMALLER = {
    "cogvideox": dict(attention_head_dim=8, time_embed_dim=8, text_embed_dim=12, num_layers=3, sample_width=8,
                      sample_height=8, max_text_seq_length=6),
    "wan": dict(attention_head_dim=8, text_dim=12, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32),
}  # fmt: skip


def tiny_cogvideox():
    return tiny_transformer("cogvideox", **SMALLER["cogvideox"])


def tiny_wan():
    return tiny_transformer("wan", **SMALLER["wan"])


def run_cogvideox(model):
    latents = torch.randn(1, 3, 4, 8, 8)  # (B, F, C, H, W): 3 latent frames, 4x4 tokens each
    return model(
        hidden_states=latents, encoder_hidden_states=torch.randn(1, 6, 12), timestep=torch.tensor([10])
    ).sample


def run_wan(model):
    latents = torch.randn(1, 4, 3, 8, 8)  # (B, C, F, H, W)
    return model(
        hidden_states=latents, encoder_hidden_states=torch.randn(1, 6, 12), timestep=torch.tensor([10])
    ).sample


FAMILIES = {
    "cogvideox": (tiny_cogvideox, lambda m: m.transformer_blocks, lambda out: out[0], run_cogvideox),
    "wan": (tiny_wan, lambda m: m.blocks, lambda out: out, run_wan),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_capture_shapes_graph_and_removal(family, checkpointing):
    build, blocks_of, select, run = FAMILIES[family]
    model = build()
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    blocks = blocks_of(model)
    with FeatureCapture(blocks, indices=(1, -1), select=select) as cap:
        out = run(model)
        assert set(cap.features) == {1, 2}
        tokens = cap[1]
        assert tokens.shape == (1, 3 * 4 * 4, 16) and tokens.requires_grad
        assert cap[-1] is cap[2]
        # the alignment gradient reaches the blocks up to the hooked one, not the later ones
        tokens.square().mean().backward(retain_graph=True)
        for hooked_or_before in (blocks[0], blocks[1]):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in hooked_or_before.parameters())
        assert all(p.grad is None for p in blocks[2].parameters())
        out.mean().backward()  # the denoising loss's backward (recomputes blocks under checkpointing)
        assert cap[1].shape == tokens.shape and len(cap.features) == 2  # slots overwritten, never appended
    assert not cap.active
    assert all(len(b._forward_hooks) == 0 for b in blocks)


def test_capture_removes_hooks_on_error_and_checks_indices():
    model = tiny_wan()
    with pytest.raises(RuntimeError, match="boom"), FeatureCapture(model.blocks, indices=(0,)) as cap:
        raise RuntimeError("boom")
    assert not cap.active and all(len(b._forward_hooks) == 0 for b in model.blocks)
    with pytest.raises(ValueError, match="0..2"):
        FeatureCapture(model.blocks, indices=(3,))
    cap = FeatureCapture(model.blocks, indices=(0,))
    with cap:
        run_wan(model)
        cap.clear()
        with pytest.raises(KeyError, match="not captured"):
            cap[0]

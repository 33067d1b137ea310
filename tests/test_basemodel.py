"""The demo's base model: real diffusers/transformers classes, a trained tiny VAE, the packaged MiniLM."""

import os

import pytest
import torch
from conftest import MICRO_BASE, MICRO_DATA
from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline

from moalign.backbones import get_backbone
from moalign.data.dataset import VideoClipDataset
from moalign.errors import MoalignError
from moalign.playground.basemodel import (
    BaseModelConfig,
    build_pipeline,
    build_transformer,
    build_vae,
    save_pipeline,
    text_encoder_folder,
    train_vae,
)
from moalign.playground.demo import link_tree


def test_geometry_of_vae_and_transformer():
    cfg = BaseModelConfig()
    assert cfg.spatial_compression == 4
    vae = build_vae(MICRO_BASE)
    z = vae.encode(torch.zeros(1, 3, 9, 32, 32)).latent_dist.mode()
    assert z.shape == (1, 4, 3, 8, 8)  # time / 4 (causal: 1 + 8 -> 1 + 2), space / 4
    assert vae.decode(z).sample.shape == (1, 3, 9, 32, 32)
    tr = build_transformer(MICRO_BASE, text_dim=384)
    spec = get_backbone("cogvideox")
    latents = torch.zeros(1, 3, 4, 8, 8)  # (B, F, C, H, W)
    assert spec.token_grid(tr, latents) == (3, 4, 4)
    assert spec.text_length(tr.config) == 16


@pytest.mark.parametrize("n", [5, 13, 10])
def test_frame_counts_the_vae_cannot_decode_are_refused(n):
    with pytest.raises(ValueError, match="8k\\+1"):
        BaseModelConfig(num_frames=17, vae_window=n)


def test_text_encoder_folder_errors_name_the_fix(tmp_path):
    with pytest.raises(MoalignError, match="no config.json"):
        text_encoder_folder(str(tmp_path))
    assert (text_encoder_folder() / "config.json").is_file()  # the packaged MiniLM


def test_train_vae_writes_a_loadable_vae_with_unit_latent_scale(playground, tmp_path):
    clips = playground(8)
    metrics = train_vae(clips, tmp_path / "run", MICRO_BASE, progress=False)
    vae = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "run" / "vae")
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    for name in ("metrics.json", "log.jsonl", "loss_curve.png", "reconstruction.png"):
        assert (tmp_path / "run" / name).is_file()
    # the training latents the scale was fixed on come out with unit standard deviation
    ds = VideoClipDataset(clips, MICRO_DATA, load_flow=False)
    frames = torch.stack([ds[i]["frames"] for i in range(6)])  # the 6 training clips (2 held out)
    with torch.no_grad():
        latents = get_backbone("cogvideox").encode_video(vae, frames)
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-4)


def test_base_pipeline_round_trips_through_a_folder(tmp_path):
    vae = build_vae(MICRO_BASE)
    vae.save_pretrained(tmp_path / "vae")
    pipe = build_pipeline(MICRO_BASE, tmp_path / "vae")
    assert pipe.text_encoder.config.hidden_size == 384 and not any(
        p.requires_grad for p in pipe.text_encoder.parameters()
    )
    save_pipeline(pipe, tmp_path / "pipe")
    loaded = CogVideoXPipeline.from_pretrained(tmp_path / "pipe")
    kw = dict(do_classifier_free_guidance=False, max_sequence_length=16)
    a, _ = pipe.encode_prompt("a red ball bounces twice on the floor", **kw)
    b, _ = loaded.encode_prompt("a red ball bounces twice on the floor", **kw)
    assert a.shape == (1, 16, 384) and torch.equal(a, b)
    for name, p in pipe.transformer.state_dict().items():
        assert torch.equal(p, loaded.transformer.state_dict()[name])


def test_link_tree_hard_links_and_replaces_folders(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "w.bin").write_bytes(b"123")
    (src / "t").mkdir()
    (src / "t" / "old").write_text("old")
    (src / "index.json").write_text("{}")
    new = tmp_path / "new"
    new.mkdir()
    (new / "fresh").write_text("fresh")
    link_tree(src, tmp_path / "dst", {"t": new})
    dst = tmp_path / "dst"
    assert (dst / "a" / "w.bin").read_bytes() == b"123" and (dst / "index.json").is_file()
    assert os.path.samefile(dst / "a" / "w.bin", src / "a" / "w.bin")  # no second copy on disk
    assert sorted(p.name for p in (dst / "t").iterdir()) == ["fresh"]

"""`export_lora` writes a run's LoRA in ComfyUI's key layout with the same weight update, for both families.

The expected names are written out here from the layouts (ComfyUI's comfy/ldm/wan/model.py and
comfy/ldm/cogvideo/model.py), not read from the module, so a wrong map fails; the Wan file is also read back
by diffusers' own converter for original-layout Wan LoRAs.
"""

import json

import pytest
import torch
from conftest import tiny_transformer
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors import safe_open

from moalign.backbones import get_backbone
from moalign.errors import MoalignError
from moalign.run.export_lora import export_lora
from moalign.run.lora import LORA_FILE, LORA_TARGETS, add_lora, save_lora

RANK, ALPHA = 4, 8.0  # alpha != rank: the scale must survive the export

# diffusers module inside block N -> ComfyUI module inside block N, per case: (family, block list, overrides,
# extra LoRA targets, map). Written out by hand from the ComfyUI model files.
WAN_ATTENTION = {  # written out here, not taken from the module: a wrong map must fail
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
}
CASES = {
    "wan": (
        "wan",
        "blocks",
        {},
        ("ffn.net.0.proj", "ffn.net.2"),
        {
            **WAN_ATTENTION,
            "ffn.net.0.proj": "ffn.0",
            "ffn.net.2": "ffn.2",
        },
    ),
    "wan-i2v": (
        "wan",
        "blocks",
        {"image_dim": 32, "added_kv_proj_dim": 32},
        ("add_k_proj", "add_v_proj"),
        {
            **WAN_ATTENTION,
            "attn2.add_k_proj": "cross_attn.k_img",
            "attn2.add_v_proj": "cross_attn.v_img",
        },
    ),
    "cogvideox": (
        "cogvideox",
        "transformer_blocks",
        {},
        ("ff.net.0.proj", "ff.net.2"),
        {
            "attn1.to_q": "q",
            "attn1.to_k": "k",
            "attn1.to_v": "v",
            "attn1.to_out.0": "attn_out",
            "ff.net.0.proj": "ff_proj",
            "ff.net.2": "ff_out",
        },
    ),
}


def make_run(tmp_path, family, overrides=None, targets=LORA_TARGETS, config=None, seed=0):
    """A stage-2 LoRA run folder (config.json + pytorch_lora_weights.safetensors) of the family's tiny
    transformer with random non-zero lora_B; returns (run folder, the trained transformer)."""
    spec = get_backbone(family)
    trained = tiny_transformer(family, seed=seed, **(overrides or {}))
    add_lora(trained, rank=RANK, alpha=ALPHA, target_modules=targets)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # stands in for training
    run = tmp_path / "my-run"
    save_lora(spec.pipeline_class, trained, run)
    cfg = config or {"backbone": family, "lora_rank": RANK, "lora_alpha": ALPHA}
    (run / "config.json").write_text(json.dumps({"config": cfg}))
    return run, trained


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("case", list(CASES))
def test_comfy_keys_are_comfyui_module_names(case, tmp_path):
    family, blocks, overrides, extra, mapping = CASES[case]
    run, trained = make_run(tmp_path, family, overrides, LORA_TARGETS + extra)
    out = export_lora(run)
    assert out == run / "comfy" / "my-run_comfy_lora.safetensors"
    tensors, meta = read(out)

    block0 = {k for k in tensors if k.startswith("diffusion_model.blocks.0.")}
    expected = {
        f"diffusion_model.blocks.0.{m}.{part}"
        for m in mapping.values()
        for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert block0 == expected
    n_blocks = len(get_backbone(family).blocks(trained))
    assert len(tensors) == n_blocks * len(mapping) * 3  # every block, nothing else
    assert all(k.startswith("diffusion_model.blocks.") for k in tensors)
    spelled_out = {  # one full key per case, as ComfyUI's model files name the modules
        "wan": "diffusion_model.blocks.3.ffn.2.alpha",
        "wan-i2v": "diffusion_model.blocks.3.cross_attn.k_img.lora_up.weight",
        "cogvideox": "diffusion_model.blocks.3.attn_out.lora_down.weight",
    }
    assert spelled_out[case] in tensors
    assert tensors["diffusion_model.blocks.0." + mapping["attn1.to_q"] + ".alpha"].shape == ()
    assert meta["format"] == "comfy" and meta["family"] == family
    assert meta["rank"] == str(RANK) and float(meta["alpha"]) == ALPHA


@pytest.mark.parametrize("case", list(CASES))
def test_exported_delta_equals_the_runs_delta(case, tmp_path):
    """For every mapped module, up @ down * alpha / r of the export == B @ A * alpha / r of the diffusers file
    == the trained module's own delta (peft's get_delta_weight)."""
    family, blocks, overrides, extra, mapping = CASES[case]
    run, trained = make_run(tmp_path, family, overrides, LORA_TARGETS + extra)
    src, _ = read(run / LORA_FILE)
    tensors, _ = read(export_lora(run))

    n_blocks = len(get_backbone(family).blocks(trained))
    for n in range(n_blocks):
        for ours, theirs in mapping.items():
            module = f"{blocks}.{n}.{ours}"
            a, b = src[f"transformer.{module}.lora_A.weight"], src[f"transformer.{module}.lora_B.weight"]
            delta_file = b @ a * (ALPHA / RANK)
            torch.testing.assert_close(delta_file, trained.get_submodule(module).get_delta_weight("default"))

            t = f"diffusion_model.blocks.{n}.{theirs}"
            down, up, alpha = (
                tensors[f"{t}.lora_down.weight"],
                tensors[f"{t}.lora_up.weight"],
                tensors[f"{t}.alpha"],
            )
            delta_export = up @ down * (alpha.item() / down.shape[0])
            assert delta_export.abs().max() > 0
            torch.testing.assert_close(delta_export, delta_file, rtol=0, atol=0)


def test_wan_export_loads_back_into_diffusers_and_reproduces_the_run(tmp_path):
    """diffusers' converter for original-layout Wan LoRAs (diffusion_model.*, lora_down/lora_up, alpha) reads
    the export into a fresh WanPipeline, which then predicts what the trained transformer predicts."""
    spec = get_backbone("wan")
    run, trained = make_run(tmp_path, "wan", targets=LORA_TARGETS + ("ffn.net.0.proj", "ffn.net.2"))
    out = export_lora(run)
    base = tiny_transformer("wan")  # same seed: the trained model's base weights
    pipe = spec.pipeline_class(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=base,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    lat, prompt, t = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 16, base.config.text_dim), torch.tensor([500])
    with torch.no_grad():
        before = spec.predict(pipe.transformer, lat, t, prompt)
        pipe.load_lora_weights(str(out.parent), weight_name=out.name)
        after = spec.predict(pipe.transformer, lat, t, prompt)
        expected = spec.predict(trained, lat, t, prompt)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_out_may_be_a_file_or_a_folder(tmp_path):
    run, _ = make_run(tmp_path, "cogvideox")
    assert export_lora(run, out=tmp_path / "x.safetensors") == tmp_path / "x.safetensors"
    (tmp_path / "loras").mkdir()
    assert export_lora(run, out=tmp_path / "loras") == tmp_path / "loras" / "my-run_comfy_lora.safetensors"
    assert not list(tmp_path.glob("loras/.*"))  # no temporary left behind
    # a folder that does not exist yet is a folder (ComfyUI/models/loras), not a file of that name
    made = export_lora(run, out=tmp_path / "ComfyUI" / "models" / "loras")
    assert (
        made == tmp_path / "ComfyUI" / "models" / "loras" / "my-run_comfy_lora.safetensors" and made.is_file()
    )
    (tmp_path / "plain").write_text("x")
    with pytest.raises(MoalignError, match="existing file without the .safetensors suffix"):
        export_lora(run, out=tmp_path / "plain")
    # readable as any file the user makes (safetensors itself creates its files 0600)
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    assert made.stat().st_mode & 0o777 == 0o666 & ~umask


def test_full_finetune_folder_is_refused(tmp_path):
    run = tmp_path / "full"
    (run / "transformer").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"backbone": "wan", "lora_rank": 0}}))
    with pytest.raises(MoalignError, match="full fine-tune"):
        export_lora(run)


def test_unmapped_key_is_refused_by_name(tmp_path):
    run, _ = make_run(tmp_path, "cogvideox", targets=("to_q", "proj_out"))
    with pytest.raises(
        MoalignError, match=r"'transformer\.proj_out\.lora_A\.weight'.*comfy/wan, comfy/cogvideox"
    ):
        export_lora(run)
    assert not (run / "comfy").exists()


def test_unknown_format_and_backbone_list_the_supported_ones(tmp_path):
    run, _ = make_run(tmp_path, "wan")
    with pytest.raises(MoalignError, match="format 'kohya'.*comfy/wan, comfy/cogvideox"):
        export_lora(run, fmt="kohya")
    (run / "config.json").write_text(json.dumps({"config": {"backbone": "ltx", "lora_rank": RANK}}))
    with pytest.raises(MoalignError, match="backbone 'ltx'"):
        export_lora(run)


def test_alpha_that_disagrees_with_the_run_config_is_refused(tmp_path):
    run, _ = make_run(tmp_path, "wan", config={"backbone": "wan", "lora_rank": RANK, "lora_alpha": 16})
    with pytest.raises(MoalignError, match="lora_alpha=8"):
        export_lora(run)


def test_cli_export_lora_writes_the_comfy_file(tmp_path):
    """`moalign export-lora RUN` writes the default file; a full fine-tune folder is a one-line error (exit 2)."""
    from moalign.cli import main

    run, _ = make_run(tmp_path, "wan")
    assert main(["export-lora", str(run)]) == 0
    tensors, _ = read(run / "comfy" / f"{run.name}_comfy_lora.safetensors")
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in tensors
    (tmp_path / "full" / "transformer").mkdir(parents=True)
    (tmp_path / "full" / "config.json").write_text('{"config": {"backbone": "wan", "lora_rank": 0}}')
    assert main(["export-lora", str(tmp_path / "full")]) == 2

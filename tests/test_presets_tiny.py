"""Every real preset end to end at tiny size on CPU, through the CLI, with only its size settings shrunk.

synth -> flow -> stage1 -> targets -> latents -> stage2 -> generate, each with `--preset NAME`: the preset's
backbone family, LoRA rank and alpha or full fine-tune, alignment (mode, lambda, tau, grid matching), gradient
checkpointing, bf16 mixed precision (CPU autocast works, so it stays on), learning rates and data fps. The
`--set` overrides below are the size settings (geometry, widths, the aligned block mapped into the 4-block
tiny model, steps, batch); the run configs are checked to hold the preset's value for every other field. The
tiny pipelines keep the released transformers' non-size flags (`tiny_pipeline_like`: RoPE for CogVideoX-5B).
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_pipeline_like
from safetensors.torch import load_file

import moalign.stage2 as stage2_mod
from moalign.alignment import MODE_TITLES
from moalign.backbones import cogvideox, get_backbone, wan
from moalign.cli import main
from moalign.data.cache import Cache
from moalign.data.video_io import read_video
from moalign.presets import get_preset
from moalign.run.lora import LORA_TARGETS
from moalign.run.serialize import to_dict

# Wan's RMSNorm under CPU bf16 autocast: torch falls back from its fused kernel and says so, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")

PRESETS = ["cogvideox-2b", "cogvideox-5b", "wan2.1-1.3b", "wan2.1-14b"]
# the released models' architectures, keyed like the presets
ARCHITECTURES = {**cogvideox.ARCHITECTURES, **wan.ARCHITECTURES}
NUM_CLIPS = 6
PROMPTS = ["a red ball falls", "a blue ball bounces twice on the floor"]
GEOMETRY = ["--num-frames", "9", "--height", "32", "--width", "32"]  # 9 frames -> 3 latent frames (8k+1)
# Stage-1 size settings. Encoder input 16x16 with patch 8 gives a 2x2 token grid, the tiny transformers' grid
# too (32 px / VAE 8 / patch 2): the integer stride CogVideoX's grid_match="videorepa" needs (1 here, 3 at
# full size). projector.in_dim is not set: stage 1 resolves it from the encoder (768 -> 32).
STAGE1_SIZE = {
    "encoder.input_size": "16,16", "projector.hidden_dim": 16, "decoder.hidden_dim": 8, "val_clips": 2,
    "steps": 2, "batch_size": 2, "warmup_steps": 1, "val_every": 1, "checkpoint_every": 1,
}  # fmt: skip
STAGE1_GEOMETRY = {"data.num_frames", "data.height", "data.width"}  # set by the GEOMETRY flags
# Stage-2 size settings; `model` (the tiny pipeline folder standing in for the hub id) and `align.layers`
# (the preset's block at the same relative depth of the tiny model) are set per preset. warmup_steps=1: the
# two steps run at the preset's learning rate, not at 1/100 of it.
STAGE2_SIZE = {
    "align.projector.hidden_dim": 16, "steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1,
}  # fmt: skip
# what each preset must train (src/moalign/presets.py, README "Choices where the paper is silent"): family, LoRA rank, alpha, lr, grid matching
RECIPES = {
    "cogvideox-2b": ("cogvideox", 0, None, 2e-6, "videorepa"),
    "cogvideox-5b": ("cogvideox", 128, 64.0, 1e-4, "videorepa"),
    "wan2.1-1.3b": ("wan", 64, 64.0, 1e-4, "resample_teacher"),
    "wan2.1-14b": ("wan", 64, 64.0, 1e-4, "resample_teacher"),
}


def _sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _assert_preset_except(recorded: dict, preset_part, changed: set[str]) -> None:
    """Every field of a run's recorded config is the preset's, except the `changed` ones."""
    want, got = _flat(to_dict(preset_part)), _flat(recorded)
    assert set(got) == set(want)
    differ = {k for k in want if got[k] != want[k]}
    assert differ <= changed, {k: (got[k], want[k]) for k in differ - changed}


@pytest.fixture(scope="module")
def world(videomae_folder, tmp_path_factory):
    """Playground clips (exact flow) at the presets' two frame rates, a tiny VideoMAE, a prompts file."""
    root = tmp_path_factory.mktemp("presets")
    data = {}
    for fps in sorted({get_preset(p).stage1.data.fps for p in PRESETS}):  # 8 (CogVideoX) and 16 (Wan)
        # native rate = the preset's fps: its window is consecutive frames, which exact flow needs
        data[fps] = root / f"data-{fps:g}fps"
        assert main(["synth", "--out", str(data[fps]), "--num-clips", str(NUM_CLIPS), *GEOMETRY, "--fps",
                     str(fps), "--seed", "0", "--quiet"]) == 0  # fmt: skip
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return SimpleNamespace(data=data, encoder=videomae_folder, prompts=root / "prompts.txt")


@pytest.fixture(scope="module")
def run(request, world, tmp_path_factory):
    """One preset through every command; records what stage 2 ran with (autocast, checkpointed blocks,
    noise schedule)."""
    preset = request.param
    r = SimpleNamespace(preset=preset, recipe=get_preset(preset), root=tmp_path_factory.mktemp(preset))
    r.spec = get_backbone(r.recipe.stage2.backbone)
    r.data = world.data[r.recipe.stage1.data.fps]
    common = ["--preset", preset, "--quiet"]
    flow, r.run1 = r.root / "flow", r.root / "run1"
    assert main(["flow", "--data", str(r.data), "--out", str(flow), "--method", "exact", *GEOMETRY,
                 *common]) == 0  # fmt: skip
    assert main(["stage1", "--data", str(r.data), "--encoder", str(world.encoder), "--out", str(r.run1),
                 "--flow-cache", str(flow), *GEOMETRY, *_sets(STAGE1_SIZE), *common]) == 0  # fmt: skip

    r.pipe = r.root / "pipe"  # stands in for the preset's hub id
    tiny_pipeline_like(preset).save_pretrained(r.pipe)
    r.base = r.spec.load_transformer(str(r.pipe))
    r.blocks = len(r.spec.blocks(r.base))
    real_blocks = ARCHITECTURES[preset]["num_layers"]
    layers = ",".join(str(i * r.blocks // real_blocks) for i in r.recipe.stage2.align.layers)  # 17/30 -> 2/4

    r.targets, r.latents = r.root / "targets", r.root / "latents"
    assert main(["targets", "--data", str(r.data), "--teacher", str(r.run1), "--out", str(r.targets), "--raw",
                 "--quiet"]) == 0  # fmt: skip
    assert main(["latents", "--data", str(r.data), "--model", str(r.pipe), "--backbone", r.spec.name, "--out",
                 str(r.latents), *GEOMETRY, *common]) == 0  # fmt: skip

    r.autocast, r.checkpointed, r.schedules = [], [], []
    real_loss, real_checkpoint = stage2_mod.stage2_loss, torch.utils.checkpoint.checkpoint

    def loss_in_autocast(spec, *args, **kwargs):
        r.autocast.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        if hasattr(spec, "scheduler"):  # CogVideoX's training noise schedule
            r.schedules.append(spec.scheduler.alphas_cumprod.clone())
        return real_loss(spec, *args, **kwargs)

    def counted_checkpoint(fn, *args, **kwargs):
        r.checkpointed.append(type(getattr(fn, "__self__", None)))  # diffusers passes block.__call__
        return real_checkpoint(fn, *args, **kwargs)

    r.run2 = r.root / "run2"
    r.sizes2 = {"model": r.pipe, "align.layers": layers, **STAGE2_SIZE}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage2_mod, "stage2_loss", loss_in_autocast)
        mp.setattr(torch.utils.checkpoint, "checkpoint", counted_checkpoint)
        assert main(["stage2", "--latents", str(r.latents), "--targets", str(r.targets), "--out", str(r.run2),
                     *_sets(r.sizes2), *common]) == 0  # fmt: skip

    r.gen = r.root / "gen"
    assert main(["generate", "--model", str(r.run2), "--prompts", str(world.prompts), "--out", str(r.gen),
                 *GEOMETRY, "--steps", "2", "--guidance-scale", "1.0", "--device", "cpu",
                 "--quiet"]) == 0  # fmt: skip
    return r


@pytest.mark.parametrize("run", PRESETS, indirect=True)
def test_stage1_and_caches_keep_the_preset_recipe(run, world):
    cfg = json.loads((run.run1 / "config.json").read_text())["config"]
    size = set(STAGE1_SIZE) | STAGE1_GEOMETRY | {"encoder.path", "projector.in_dim"}
    _assert_preset_except(cfg, run.recipe.stage1, size)
    assert cfg["encoder"]["path"] == str(world.encoder) and cfg["projector"]["in_dim"] == 32
    # the paper-scale recipe's own choices survive: L1 flow loss, lr, no feature cache, bf16, the data fps
    got = (cfg["flow_loss"], cfg["lr"], cfg["feature_cache"], cfg["mixed_precision"])
    assert got == ("l1", 1e-4, "none", "bf16")
    assert cfg["data"]["fps"] == (8.0 if run.spec.name == "cogvideox" else 16.0)
    metrics = json.loads((run.run1 / "metrics.json").read_text())
    assert metrics["token_grid"] == [4, 2, 2] and metrics["steps"] == 2 and metrics["val_clips"] == 2
    assert math.isfinite(metrics["val_epe"]) and metrics["zero_flow_epe"] > 0
    assert (run.run1 / "motion_projector.safetensors").is_file() and (run.run1 / "checkpoint-1").is_dir()

    # the pipeline folder loads as the family's transformer with the released model's flags
    assert type(run.base).__name__ == run.spec.transformer_class_name
    for key in ("use_rotary_positional_embeddings", "qk_norm", "cross_attn_norm"):
        if key in ARCHITECTURES[run.preset]:
            assert run.base.config[key] == ARCHITECTURES[run.preset][key]
    lat, tgt = Cache(run.latents, kind="latents"), Cache(run.targets)
    assert len(lat) == len(tgt) == NUM_CLIPS
    assert tuple(lat[0]["latents"].shape) == ((3, 4, 4, 4) if run.spec.name == "cogvideox" else (4, 3, 4, 4))
    assert tuple(tgt[0]["motion"].shape) == (4, 2, 2, 64) and tuple(tgt[0]["encoder"].shape) == (4, 2, 2, 32)


@pytest.mark.parametrize("run", PRESETS, indirect=True)
def test_stage2_trains_the_preset_recipe_and_saves_loadable_weights(run):
    cfg = json.loads((run.run2 / "config.json").read_text())["config"]
    # the validation geometry left open by the preset is the latents cache's
    _assert_preset_except(cfg, run.recipe.stage2, set(run.sizes2) | {"validation_frames", "validation_size"})
    assert cfg["model"] == str(run.pipe) and cfg["align"]["layers"] == [2]
    align = cfg["align"]
    got = (cfg["backbone"], cfg["lora_rank"], cfg["lora_alpha"], cfg["lr"], align["projector"]["grid_match"])
    assert got == RECIPES[run.preset]
    assert (align["mode"], align["lam"], align["tau"]) == ("moalign", 0.5, 10.0)
    assert cfg["gradient_checkpointing"] is True and cfg["mixed_precision"] == "bf16"
    # ... and they took effect: bf16 autocast around every loss, every block checkpointed in every forward
    # (the relational loss checkpoints its own chunks too, hence the count by block type)
    steps = STAGE2_SIZE["steps"]
    assert run.autocast == [torch.bfloat16] * steps
    assert run.checkpointed.count(type(run.spec.blocks(run.base)[0])) == steps * run.blocks
    metrics = json.loads((run.run2 / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["align_mode"] == "moalign"
    assert all(math.isfinite(metrics[k]) and metrics[k] > 0 for k in ("diffusion", "align", "total"))
    assert (run.run2 / "checkpoint-1").is_dir() and (run.run2 / "align_projector.safetensors").is_file()

    card = (run.run2 / "README.md").read_text()
    assert f"base_model: {run.pipe}" in card and "mixed precision bf16" in card
    assert f"{MODE_TITLES['moalign']} (`--align moalign`)" in card and "lambda 0.5, tau 10.0" in card

    # the trained weights load the way the model card says and change what the transformer predicts
    item = Cache(run.latents, kind="latents")[0]
    x0, emb = item["latents"][None].float(), item["prompt_embeds"][None].float()
    noisy = 0.5 * x0 + 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500]) if run.spec.name == "cogvideox" else torch.tensor([500.0])

    @torch.no_grad()
    def predict(transformer):
        return run.spec.predict(transformer.eval(), noisy, t, emb)

    rank, alpha = run.recipe.stage2.lora_rank, run.recipe.stage2.lora_alpha
    if rank > 0:
        assert f"LoRA rank {rank}, alpha {alpha}" in card and not (run.run2 / "transformer").exists()
        lora = load_file(run.run2 / "pytorch_lora_weights.safetensors")
        a_keys, b_keys = [k for k in lora if "lora_A" in k], [k for k in lora if "lora_B" in k]
        targeted = [n for n, _ in run.base.named_modules() if n.endswith(LORA_TARGETS)]
        assert len(a_keys) == len(b_keys) == len(targeted) and all(lora[k].shape[0] == rank for k in a_keys)
        assert all(lora[k].abs().max() > 0 for k in b_keys)  # B starts at zero: training moved every one
        pipe = run.spec.pipeline_class.from_pretrained(run.pipe)
        before = predict(pipe.transformer)
        pipe.load_lora_weights(run.run2)
        adapter = next(iter(pipe.transformer.peft_config.values()))
        assert (adapter.r, adapter.lora_alpha) == (rank, alpha)  # the trained scale alpha / r travels along
        after = predict(pipe.transformer)
    else:
        assert "full fine-tune (transformer/)" in card
        assert not (run.run2 / "pytorch_lora_weights.safetensors").exists()
        tuned = type(run.base).from_pretrained(run.run2 / "transformer")
        arch = {k: v for k, v in run.base.config.items() if not k.startswith("_")}
        assert {k: tuned.config[k] for k in arch} == arch
        ref, new = run.base.state_dict(), tuned.state_dict()
        assert ref.keys() == new.keys()
        moved = [k for k in ref if not torch.equal(ref[k], new[k])]
        assert len(moved) > len(ref) // 2, f"only {len(moved)} of {len(ref)} tensors changed"
        before, after = predict(run.base), predict(tuned)
    assert before.shape == after.shape == x0.shape
    assert (after - before).abs().max() > 0


@pytest.mark.parametrize("run", PRESETS, indirect=True)
def test_generate_from_the_run_folder(run):
    rows = [json.loads(line) for line in (run.gen / "metadata.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == PROMPTS and [r["seed"] for r in rows] == [0, 1]
    assert sorted(p.name for p in run.gen.glob("*.mp4")) == [r["video"] for r in rows]
    for r in rows:
        frames, _ = read_video(run.gen / r["video"])
        assert frames.shape == (9, 32, 32, 3)


@pytest.mark.parametrize(
    "run",
    ["cogvideox-2b", "cogvideox-5b"],
    indirect=True,
)
def test_cogvideox_trains_with_its_pipelines_noise_schedule(run):
    """v-prediction fine-tuning must use the alphas_cumprod the model is sampled with (diffusers' CogVideoX
    training examples load the scheduler from the model folder)."""
    from diffusers import CogVideoXDPMScheduler

    sampling = CogVideoXDPMScheduler.from_pretrained(run.pipe, subfolder="scheduler").alphas_cumprod
    assert len(run.schedules) == STAGE2_SIZE["steps"]
    for trained in run.schedules:
        torch.testing.assert_close(trained, sampling, rtol=0, atol=0)

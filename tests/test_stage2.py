"""Stage 2 from caches at tiny size: every output, LoRA vs full, exact resume, non-finite stop, clear errors."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import interrupted_at_call, tiny_transformer
from safetensors.torch import load_file

import moalign.stage2 as stage2_mod
from moalign.align_projector import AlignProjectorConfig
from moalign.alignment import AlignConfig
from moalign.backbones import get_backbone
from moalign.errors import MoalignError
from moalign.stage2 import Stage2Config, train_stage2

N = 6
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def caches(stage2_caches):
    return stage2_caches(N)


def _cfg(mode="moalign", **kw):
    align = AlignConfig(mode=mode, layers=(1,), projector=AlignProjectorConfig(hidden_dim=16))
    return Stage2Config(backbone="cogvideox", model="tiny-random", align=align, steps=4, batch_size=2, lr=1e-3, warmup_steps=1,
                        log_every=1, checkpoint_every=2, **kw)  # fmt: skip


def test_lora_run_outputs_and_pipeline_loading(caches, tmp_path):
    metrics = train_stage2(
        caches / "latents", tmp_path / "run", _cfg(lora_rank=4), caches / "targets", progress=False
    )
    run = tmp_path / "run"
    for name in ("pytorch_lora_weights.safetensors", "align_projector.safetensors", "config.json", "log.jsonl",
                 "metrics.json", "loss_curve.png", "checkpoint-2"):  # fmt: skip
        assert (run / name).exists(), name
    assert {"diffusion", "align", "spatial", "temporal", "total"} <= set(metrics)
    spec = get_backbone("cogvideox")
    pipe = spec.pipeline_class(None, None, None, tiny_transformer("cogvideox"), spec.scheduler)
    pipe.load_lora_weights(run)  # loads straight into the diffusers pipeline
    card = (run / "README.md").read_text()  # the model card
    header = card.split("---")[1]
    assert "library_name: diffusers" in header and "base_model" not in header  # random init: no base model
    assert "pipe.load_lora_weights" in card and "LoRA rank 4" in card and "moalign" in card


def test_full_finetune_saves_a_transformer_folder(caches, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    train_stage2(caches / "latents", tmp_path / "full", _cfg("trd"), caches / "targets", progress=False)
    model = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "full" / "transformer")
    assert model.config.num_layers == 4
    card = (tmp_path / "full" / "README.md").read_text()
    assert 'CogVideoXTransformer3DModel.from_pretrained("RUN/transformer"' in card and "trd" in card
    assert "full fine-tune" in card


def test_no_alignment_needs_no_targets(caches, tmp_path):
    m = train_stage2(caches / "latents", tmp_path / "none", _cfg("none", lora_rank=2), progress=False)
    assert m["align"] == 0


def test_resume_matches_uninterrupted(caches, tmp_path):
    cfg = _cfg(lora_rank=4)
    train_stage2(caches / "latents", tmp_path / "a", cfg, caches / "targets", progress=False)
    with interrupted_at_call("moalign.stage2.stage2_loss", 4), pytest.raises(KeyboardInterrupt):
        train_stage2(caches / "latents", tmp_path / "b", cfg, caches / "targets", progress=False)
    train_stage2(caches / "latents", tmp_path / "b", cfg, caches / "targets", resume="latest", progress=False)
    for name in ("pytorch_lora_weights.safetensors", "align_projector.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_latest_is_safe_to_repeat(caches, tmp_path):
    """One launch command (`--resume latest`) serves a fresh start, a restart after a kill, and a finished run;
    a folder is never overwritten without being asked, and a resume with other settings is refused."""
    cfg = _cfg(lora_rank=4)
    run = tmp_path / "run"
    # dies in step 3, after checkpoint-2
    with interrupted_at_call("moalign.stage2.stage2_loss", 3), pytest.raises(KeyboardInterrupt):
        train_stage2(caches / "latents", run, cfg, caches / "targets", progress=False)
    with pytest.raises(MoalignError, match="unfinished stage-2 run; add --resume latest"):
        train_stage2(caches / "latents", run, cfg, caches / "targets", progress=False)
    with pytest.raises(MoalignError, match=r"other settings.*\n  weight_decay: 0.0 -> 0.1"):
        train_stage2(
            caches / "latents", run, replace(cfg, weight_decay=0.1), caches / "targets", resume="latest"
        )
    first = train_stage2(caches / "latents", run, cfg, caches / "targets", resume="latest", progress=False)
    weights = (run / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    again = train_stage2(caches / "latents", run, cfg, caches / "targets", resume="latest", progress=False)
    assert again == first and (run / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == weights
    with pytest.raises(MoalignError, match="finished stage-2 run"):
        train_stage2(caches / "latents", run, cfg, caches / "targets", progress=False)
    # fewer steps than it ran: refused, naming a checkpoint to continue from
    with pytest.raises(
        MoalignError, match=r"run of 4 steps and this command asks for 3 \(fewer.*checkpoint-4"
    ):
        train_stage2(caches / "latents", run, replace(cfg, steps=3), caches / "targets", resume="latest")


def test_resume_latest_extends_a_finished_run(caches, tmp_path):
    """A finished 4-step run asked for 6 with --resume latest continues from its last step's checkpoint: steps 4
    and 5 are trained on the 6-step LR schedule (as stated), and the result differs from the 4-step run."""
    cfg = _cfg(lora_rank=4)
    run = tmp_path / "run"
    train_stage2(caches / "latents", run, cfg, caches / "targets", progress=False)
    assert (run / "checkpoint-4").is_dir()  # the last step is checkpointed (4 % checkpoint_every == 0 anyway)
    before = load_file(run / "pytorch_lora_weights.safetensors")
    longer = train_stage2(
        caches / "latents", run, replace(cfg, steps=6), caches / "targets", resume="latest", progress=False
    )
    assert longer["steps"] == 6 and (run / "checkpoint-6").is_dir()
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "total" in r]
    assert steps == [0, 1, 2, 3, 4, 5]
    # warm-up 1, cosine to 10% over 6 steps: the factor after step 4's update
    from moalign.run.training import cosine_with_warmup

    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = cosine_with_warmup(probe, cfg.warmup_steps, 6)
    for _ in range(5):
        sched.step()
    lr4 = next(r["lr"] for r in rows if r["step"] == 4 and "total" in r)
    assert lr4 == pytest.approx(sched.get_last_lr()[0], rel=1e-6)
    after = load_file(run / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # a run that does not end on a checkpoint of its last step (e.g. from before it was written) is refused
    import shutil

    shutil.rmtree(run / "checkpoint-6")
    with pytest.raises(
        MoalignError, match=r"run of 6 steps and this command asks for 8.*--resume .*checkpoint-4"
    ):
        train_stage2(caches / "latents", run, replace(cfg, steps=8), caches / "targets", resume="latest")


def test_checkpoints_hold_weights_people_load(caches, tmp_path):
    """checkpoint-N of a LoRA run loads with `load_lora_weights` (the last one equals the final file); of a full
    fine-tune, its transformer/ loads with `from_pretrained` and equals the resume weights."""
    from diffusers import CogVideoXTransformer3DModel

    run = tmp_path / "lora"
    train_stage2(caches / "latents", run, _cfg(lora_rank=4), caches / "targets", progress=False)
    final = load_file(run / "pytorch_lora_weights.safetensors")
    last = load_file(run / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    mid = load_file(run / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(final[k], mid[k]) for k in final)
    spec = get_backbone("cogvideox")
    pipe = spec.pipeline_class(None, None, None, tiny_transformer("cogvideox"), spec.scheduler)
    pipe.load_lora_weights(run / "checkpoint-2")
    (adapter,) = pipe.get_active_adapters()  # one adapter, active
    loaded = {n.replace(f".{adapter}", ""): p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    assert {f"transformer.{n}" for n in loaded} == set(mid)
    assert all(torch.equal(loaded[k.removeprefix("transformer.")].detach(), v) for k, v in mid.items())

    full = tmp_path / "full"
    train_stage2(caches / "latents", full, _cfg("trd"), caches / "targets", progress=False)
    model = CogVideoXTransformer3DModel.from_pretrained(full / "checkpoint-2" / "transformer")
    resume = load_file(full / "checkpoint-2" / "transformer_trainable.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in resume.items()) and len(resume) > 10


def test_gradient_accumulation_equals_the_full_batch(caches, tmp_path):
    """A global batch of 4 in 2 micro-batches of 2 trains the same weights as one batch of 4 (same samples,
    same per-sample noise); the logged loss is the batch mean either way."""
    full = _cfg("moalign", lora_rank=0, report_to="none")
    accum = replace(full, gradient_accumulation_steps=2)
    half = replace(full, batch_size=2)
    runs = {}
    for name, cfg in (
        ("full", replace(full, batch_size=4)),
        ("accum", replace(accum, batch_size=4)),
        ("half", half),
    ):
        runs[name] = train_stage2(
            caches / "latents", tmp_path / name, cfg, caches / "targets", progress=False
        )
    assert runs["accum"]["diffusion"] == pytest.approx(runs["full"]["diffusion"], rel=1e-5)
    w = {n: load_file(tmp_path / n / "transformer" / "diffusion_pytorch_model.safetensors") for n in runs}
    gap = max(float((w["accum"][k] - w["full"][k]).abs().max()) for k in w["full"])
    half_gap = max(float((w["half"][k] - w["full"][k]).abs().max()) for k in w["full"])
    assert gap < 2e-5 and half_gap > 100 * gap, (gap, half_gap)
    with pytest.raises(MoalignError, match="split evenly into 1 process.*x 3 accumulation"):
        train_stage2(caches / "latents", tmp_path / "bad", replace(accum, batch_size=4, gradient_accumulation_steps=3),
                     caches / "targets", progress=False)  # fmt: skip


def test_tensorboard_log_follows_the_json_log(caches, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_stage2(caches / "latents", tmp_path / "tb", _cfg(lora_rank=2), caches / "targets", progress=False)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert {"diffusion", "align", "total", "lr"} <= set(events.Tags()["scalars"])
    logged = [
        (r["step"], r["total"])
        for r in map(json.loads, (tmp_path / "tb" / "log.jsonl").read_text().splitlines())
    ]
    board = [(e.step, e.value) for e in events.Scalars("total")]
    assert [s for s, _ in board] == [s for s, _ in logged] == [0, 1, 2, 3]
    assert [v for _, v in board] == pytest.approx([v for _, v in logged], rel=1e-6)
    with pytest.raises(ValueError, match="report_to must be one of none, tensorboard, wandb, all"):
        _cfg(report_to="comet")


def test_lora_under_bf16_keeps_the_base_in_bf16_and_trains_float32_adapters(caches, tmp_path):
    model = tiny_transformer("cogvideox")
    cfg = _cfg(lora_rank=4, mixed_precision="bf16", report_to="none")
    m = train_stage2(caches / "latents", tmp_path / "bf16", cfg, caches / "targets", progress=False,
                     transformer=model)  # fmt: skip
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    saved = load_file(tmp_path / "bf16" / "pytorch_lora_weights.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32} and torch.isfinite(torch.tensor(m["total"]))


def test_non_finite_loss_stops_with_step_and_parts(caches, tmp_path, monkeypatch):
    real = stage2_mod.stage2_loss

    def nan_loss(*a, **k):
        parts = real(*a, **k)
        parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(stage2_mod, "stage2_loss", nan_loss)
    with pytest.raises(MoalignError, match=r"non-finite loss at step 0: .*diffusion=.*align="):
        train_stage2(
            caches / "latents", tmp_path / "nan", _cfg(lora_rank=2), caches / "targets", progress=False
        )


def test_errors(caches, tmp_path):
    with pytest.raises(ValueError, match="validation_prompts"):
        Stage2Config(validate_every=10)
    with pytest.raises(MoalignError, match="out of range.*0..3"):
        bad = replace(_cfg(), align=replace(_cfg().align, layers=(17,)))
        train_stage2(caches / "latents", tmp_path / "z", bad, caches / "targets", progress=False)
    with pytest.raises(MoalignError, match="needs --targets"):
        train_stage2(caches / "latents", tmp_path / "x", _cfg(), progress=False)
    with pytest.raises(MoalignError, match="neither a diffusers pipeline"):
        train_stage2(
            caches / "latents", tmp_path / "y", replace(_cfg(), model=str(tmp_path)), caches / "targets"
        )


def test_cli_stage2_runs_from_caches(caches, tmp_path, capsys):
    from moalign.cli import main

    argv = ["stage2", "--latents", str(caches / "latents"), "--targets", str(caches / "targets"), "--out",
            str(tmp_path / "cli"), "--align", "motion-trd", "--layers", "1", "--lora-rank", "2", "--steps", "2",
            "--set", "batch_size=2", "--set", "align.projector.hidden_dim=8", "--model", "tiny-random", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "cli" / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(
        SystemExit
    ) as exit_info:  # --align takes its choices from ALIGN_MODES: argparse exits 2
        main(argv[:-1] + ["--align", "bogus", "--quiet"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    # a bad value reaching the config is refused by moalign itself (exit 2, no traceback)
    assert main(argv[:-1] + ["--set", "align.bogus=1", "--quiet"]) == 2
    assert "unknown config field" in capsys.readouterr().err


def test_cli_config_round_trip_of_a_runs_config_json(caches, tmp_path):
    """A run's config.json is valid --config: the same command on it gives the same resolved config (a repeat),
    and with --steps and --resume latest on the run's own folder, it extends the run."""
    from moalign.cli import main

    run = tmp_path / "a"
    argv = ["stage2", "--latents", str(caches / "latents"), "--targets", str(caches / "targets"), "--quiet"]
    assert main([*argv, "--out", str(run), "--model", "tiny-random", "--align", "motion-trd", "--layers", "1",
                 "--lora-rank", "2", "--steps", "2", "--lr", "0.003", "--batch-size", "2",
                 "--validation-prompt", "a red ball, bouncing", "--set", "align.projector.hidden_dim=8"]) == 0  # fmt: skip
    first = json.loads((run / "config.json").read_text())["config"]
    assert first["lr"] == 0.003 and first["validation_prompts"] == ["a red ball, bouncing"]
    assert main([*argv, "--out", str(tmp_path / "b"), "--config", str(run / "config.json")]) == 0
    again = json.loads((tmp_path / "b" / "config.json").read_text())["config"]
    assert again == first
    a, b = load_file(run / "pytorch_lora_weights.safetensors"), load_file(tmp_path / "b" / LORA)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run, repeated from its folder
    assert main([*argv, "--out", str(run), "--config", str(run / "config.json"), "--steps", "4",
                 "--resume", "latest"]) == 0  # fmt: skip
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4 and (run / "checkpoint-4").is_dir()


def test_lora_targets_feed_forward_too(caches, tmp_path):
    """lora_targets=attention,feed-forward puts adapters on the blocks' FeedForward as well; the file loads into
    the pipeline; an unknown module name is a one-line error naming the groups."""
    run = tmp_path / "ff"
    train_stage2(caches / "latents", run, _cfg(lora_rank=2, lora_targets=("attention", "feed-forward")),
                 caches / "targets", progress=False)  # fmt: skip
    keys = set(load_file(run / LORA))
    assert "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.ff.net.2.lora_B.weight" in keys
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    default = set(load_file(_lora_only(caches, tmp_path)))
    assert not any(".ff." in k for k in default)  # attention only by default
    spec = get_backbone("cogvideox")
    pipe = spec.pipeline_class(None, None, None, tiny_transformer("cogvideox"), spec.scheduler)
    pipe.load_lora_weights(run)
    assert any("ff.net.2.lora_B" in n for n, _ in pipe.transformer.named_parameters())
    with pytest.raises(
        MoalignError, match="cannot put LoRA on \\['nonexistent'\\].*groups: attention, feed-forward"
    ):
        train_stage2(caches / "latents", tmp_path / "bad", _cfg(lora_rank=2, lora_targets=("nonexistent",)),
                     caches / "targets", progress=False)  # fmt: skip


def _lora_only(caches, tmp_path):
    train_stage2(caches / "latents", tmp_path / "att", _cfg(lora_rank=2), caches / "targets", progress=False)
    return tmp_path / "att" / LORA


def test_fp8_storage_of_the_frozen_base(caches, tmp_path):
    """base_storage_dtype=float8_e4m3fn keeps the frozen base's block weights in fp8 (a quarter of float32) while
    the LoRA adapters train in float32; the loss stays close to the full-precision run's."""
    ref = train_stage2(caches / "latents", tmp_path / "ref", _cfg(lora_rank=2), caches / "targets",
                       transformer=tiny_transformer("cogvideox"), progress=False)  # fmt: skip
    transformer = tiny_transformer("cogvideox")
    m = train_stage2(caches / "latents", tmp_path / "fp8", _cfg(lora_rank=2, base_storage_dtype="float8_e4m3fn"),
                     caches / "targets", transformer=transformer, progress=False)  # fmt: skip
    dtypes = {n: p.dtype for n, p in transformer.named_parameters()}
    assert dtypes["transformer_blocks.0.attn1.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.ff.net.2.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.attn1.to_q.lora_A.default.weight"] == torch.float32
    assert all(v.dtype == torch.float32 for v in load_file(tmp_path / "fp8" / LORA).values())
    assert m["diffusion"] == pytest.approx(ref["diffusion"], rel=0.1) and m["diffusion"] != ref["diffusion"]
    with pytest.raises(ValueError, match="full fine-tune trains every weight"):
        _cfg(lora_rank=0, base_storage_dtype="float8_e4m3fn")


def test_adamw8bit_comes_from_bitsandbytes(caches, tmp_path, monkeypatch):
    """optimizer=adamw8bit builds bitsandbytes' AdamW8bit (a stand-in module here: CI has no bitsandbytes), and
    says how to install it when it is missing."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(MoalignError, match=r"needs bitsandbytes: pip install 'moalign\[bnb\]'"):
        train_stage2(
            caches / "latents", tmp_path / "a", _cfg(lora_rank=2, optimizer="adamw8bit"), caches / "targets"
        )
    made = []

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, **kw)

    fake = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=AdamW8bit))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    train_stage2(caches / "latents", tmp_path / "b", _cfg(lora_rank=2, optimizer="adamw8bit"), caches / "targets",
                 progress=False)  # fmt: skip
    assert made == [{"lr": 1e-3, "weight_decay": 0.0}]


def test_latents_and_targets_of_other_frames_are_refused(caches, tmp_path):
    """Caches of the same clips cut to other frames (17 latents frames, 9-frame teacher windows) are refused with
    both values; other sizes are fine (the teacher encodes at its own resolution)."""
    import shutil

    for name in ("latents", "targets"):
        shutil.copytree(caches / name, tmp_path / name)

    def geometry(name, **data):
        for file in ("cache.json", "manifest.json"):  # the header and the finished cache's manifest
            path = tmp_path / name / file
            header = json.loads(path.read_text())
            header["fingerprint"]["data"] = {"num_frames": 17, "height": 64, "width": 64, "fps": None, **data}
            path.write_text(json.dumps(header))

    geometry("latents", num_frames=17, height=480)
    geometry("targets", num_frames=9, height=160)
    with pytest.raises(MoalignError, match="cut different frames from each video \\(num_frames 17 vs 9\\)"):
        train_stage2(tmp_path / "latents", tmp_path / "run", _cfg(lora_rank=2), tmp_path / "targets")
    geometry("targets", num_frames=17, height=160)
    assert train_stage2(tmp_path / "latents", tmp_path / "run", _cfg(lora_rank=2), tmp_path / "targets",
                        progress=False)["steps"] == 4  # fmt: skip


def test_a_new_lora_rank_keeps_the_presets_scale(caches, monkeypatch):
    """--lora-rank without --lora-alpha keeps the preset's alpha/rank (cogvideox-5b: 64/128), not its alpha;
    --lora-alpha sets it."""
    from moalign.cli import main

    seen = []
    monkeypatch.setattr(stage2_mod, "train_stage2", lambda latents, out, cfg, **kw: seen.append(cfg))
    argv = ["stage2", "--latents", str(caches / "latents"), "--out", "x", "--preset", "cogvideox-5b"]
    assert main([*argv, "--lora-rank", "32"]) == 0
    assert main([*argv, "--lora-rank", "32", "--lora-alpha", "8"]) == 0
    assert main(argv) == 0
    assert [(c.lora_rank, c.lora_alpha) for c in seen] == [(32, 16.0), (32, 8.0), (128, 64.0)]


@pytest.mark.parametrize(("stored", "precision"), [(torch.bfloat16, "no"), (torch.float16, "bf16")])
def test_caches_of_any_dtype_train_under_any_precision(stored, precision, caches, tmp_path, caplog):
    """A bfloat16 latents cache under fp32 training (and a float16 one under bf16 autocast) used to die with a
    dtype-mismatch traceback: batches are cast to float32 as they load, said once in the log, and the run
    equals one on the same values stored in float32."""
    from moalign.data.cache import Cache
    from moalign.data.cache_writer import CacheWriter

    def copy(dst, dtype):  # the fixture's latents rounded to `stored`, kept as `dtype`
        cache = Cache(caches / "latents")
        w = CacheWriter(dst, cache.kind, cache.fingerprint, len(cache.indices), shard_size=4)
        for s in w.shards_todo():
            w.write_shard(
                s, {i: {k: v.to(stored).to(dtype) for k, v in cache[i].items()} for i in w.items_of(s)}
            )
        w.finalize()

    copy(tmp_path / "low" / "latents", stored)
    copy(tmp_path / "ref" / "latents", torch.float32)
    cfg = _cfg(lora_rank=2, mixed_precision=precision, report_to="none")
    with caplog.at_level("INFO", logger="moalign"):
        low = train_stage2(
            tmp_path / "low" / "latents", tmp_path / "run-low", cfg, caches / "targets", progress=False
        )
    assert (
        f"latents/latents {str(stored).removeprefix('torch.')}" in caplog.text
        and "cast to float32" in caplog.text
    )
    ref = train_stage2(
        tmp_path / "ref" / "latents", tmp_path / "run-ref", cfg, caches / "targets", progress=False
    )
    assert torch.isfinite(torch.tensor(low["total"]))
    assert low["total"] == ref["total"] and low["diffusion"] == ref["diffusion"]


def test_validation_geometry_is_checked_before_any_model_loads(caches, tmp_path, capsys):
    from moalign.cli import main

    argv = ["stage2", "--latents", str(caches / "latents"), "--targets", str(caches / "targets"),
            "--out", str(tmp_path / "run"), "--layers", "1", "--model", "tiny-random", "--quiet",
            "--validate-every", "1", "--validation-prompt", "a ball", "--set", "validation_pipeline=/nonexistent"]  # fmt: skip
    assert main([*argv, "--set", "validation_frames=16", "--set", "validation_size=72,64"]) == 2
    err = capsys.readouterr().err
    assert "validation_frames=16 is not 4k+1 for cogvideox: use 13 or 17" in err, err
    assert "height 72 is not a multiple of 16 for cogvideox: use 64 or 80" in err
    assert not (tmp_path / "run").exists()


def test_a_resume_onto_another_teachers_targets_is_refused(caches, tmp_path):
    """The run records its caches by content (RUN/config.json "inputs"): the same folder resumed on the targets
    of another teacher would mix two teachers."""
    from moalign.data.cache import Cache
    from moalign.data.cache_writer import CacheWriter

    theirs = Cache(caches / "targets")
    other = CacheWriter(
        tmp_path / "other", theirs.kind, {**theirs.fingerprint, "teacher_sha256": "another"}, N, 4
    )
    for s in other.shards_todo():
        other.write_shard(s, {i: theirs[i] for i in other.items_of(s)})
    other.finalize()
    cfg, run = _cfg(lora_rank=2), tmp_path / "run"
    with interrupted_at_call("moalign.stage2.stage2_loss", 3), pytest.raises(KeyboardInterrupt):
        train_stage2(caches / "latents", run, cfg, caches / "targets", progress=False)
    recorded = json.loads((run / "config.json").read_text())["inputs"]
    assert recorded == {"latents": Cache(caches / "latents").digest, "targets": theirs.digest}
    with pytest.raises(MoalignError, match=r"(?s)trained on other inputs.*targets: "):
        train_stage2(caches / "latents", run, cfg, tmp_path / "other", resume="latest", progress=False)
    train_stage2(caches / "latents", run, cfg, caches / "targets", resume="latest", progress=False)  # its own


def test_other_settings_are_refused_with_the_runs_own_advice_finished_or_not(caches, tmp_path):
    """A resume with other settings lists them and says to re-run with the run's settings (not that the run's
    own checkpoint is foreign); a finished run asked again with other settings is refused too (was: "nothing
    to do", exit 0)."""
    cfg, run = _cfg(lora_rank=2), tmp_path / "run"
    other = replace(cfg, align=replace(cfg.align, layers=(0,)))
    with interrupted_at_call("moalign.stage2.stage2_loss", 3), pytest.raises(KeyboardInterrupt):
        train_stage2(caches / "latents", run, cfg, caches / "targets", progress=False)
    with pytest.raises(
        MoalignError, match=r"(?s)cannot resume .*align.layers: \[1\] -> \[0\].*run's settings"
    ) as e:
        train_stage2(caches / "latents", run, other, caches / "targets", resume="latest", progress=False)
    assert "foreign" not in str(e.value) and "not a checkpoint of this run" not in str(e.value)
    train_stage2(
        caches / "latents", run, cfg, caches / "targets", resume="latest", progress=False
    )  # finishes
    with pytest.raises(MoalignError, match=r"(?s)align.layers: \[1\] -> \[0\]"):
        train_stage2(caches / "latents", run, other, caches / "targets", resume="latest", progress=False)
    again = train_stage2(caches / "latents", run, cfg, caches / "targets", resume="latest", progress=False)
    assert again["steps"] == cfg.steps  # the same settings: nothing to do

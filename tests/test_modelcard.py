"""The stage-2 model card read back with huggingface_hub (license, pipeline tag, tags, absolute base model, the
global batch), and `push_to_hub` up to the Hub call: which files, which repo, what a failure says."""

import json
import shutil
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from moalign import stage2
from moalign.align_projector import AlignProjectorConfig
from moalign.alignment import AlignConfig
from moalign.backbones import get_backbone
from moalign.errors import MoalignError
from moalign.run.hub import push_to_hub
from moalign.run.modelcard import RANDOM_MODEL, hub_card, model_card, write_model_card
from moalign.run.serialize import to_dict
from moalign.stage2 import Stage2Config, train_stage2

SPEC = get_backbone("cogvideox")
DATA = {"num_clips": 6, "manifest_sha256": "abc", "data": {}}


def _config(**kw) -> dict:
    align = AlignConfig(mode="moalign", layers=(1,), projector=AlignProjectorConfig(hidden_dim=16))
    return to_dict(Stage2Config(backbone="cogvideox", align=align, steps=4, batch_size=8, lr=1e-3, **kw))


def _base_folder(root, license_yaml: str | None):
    """A local base pipeline folder with (or without) a README.md card stating a license."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    if license_yaml is not None:
        (root / "README.md").write_text(f"---\n{license_yaml}\ntags: [video]\n---\n# base\n")
    return root


def test_card_fields_read_back_with_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _base_folder(tmp_path / "bases" / "cog", "license: apache-2.0")
    config = _config(model="bases/cog", lora_rank=4, gradient_accumulation_steps=2)  # relative, as typed
    metrics = {"num_processes": 2, "total": 0.5, "train_seconds": 3.0}
    write_model_card(tmp_path / "run", config, metrics, DATA, SPEC)

    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.license == "apache-2.0"  # from the base folder's own card
    assert card.data.pipeline_tag == "text-to-video" and card.data.library_name == "diffusers"
    assert card.data.tags == ["text-to-video", "diffusers", "moalign", "lora", "cogvideox", "align-moalign"]
    base = (tmp_path / "bases" / "cog").resolve()
    assert card.data.base_model == str(base)  # absolute, whatever the cwd was
    assert (
        "global batch of 8 clips per optimizer step (2 processes x 2 micro-batches of 2 clips per process)"
        in (card.text)
    )
    assert f'CogVideoXPipeline.from_pretrained("{base}"' in card.text and "train_seconds" not in card.text
    assert 'pipe.load_lora_weights("RUN")' in card.text and "License: `other`" not in card.text


def test_unknown_license_is_other_and_a_full_fine_tune_has_no_lora_tag(tmp_path):
    base = _base_folder(tmp_path / "cog", None)  # no card: the license is unknown
    card = ModelCard(model_card(_config(model=str(base)), {"total": 0.5}, DATA, SPEC))
    assert card.data.license == "other" and "License: `other` until stated" in card.text
    assert "lora" not in card.data.tags and "align-moalign" in card.data.tags
    assert (
        "global batch of 8 clips per optimizer step (1 process x 1 micro-batch of 8 clips per process)"
        in card.text
    )
    # a license the config states wins over the base's card
    licensed = _base_folder(
        tmp_path / "wan", "license: other\nlicense_name: base-license\nlicense_link: LICENSE"
    )
    card = ModelCard(model_card({**_config(model=str(licensed)), "license": "mit"}, {}, DATA, SPEC))
    assert card.data.license == "mit" and card.data.license_name is None
    card = ModelCard(
        model_card(_config(model=str(licensed)), {}, DATA, SPEC)
    )  # a custom license: name and link
    assert (card.data.license, card.data.license_name, card.data.license_link) == (
        "other",
        "base-license",
        "LICENSE",
    )
    # no base model (a random transformer, asked for by name): no base_model field
    assert RANDOM_MODEL == stage2.RANDOM_MODEL
    card = ModelCard(model_card(_config(model=RANDOM_MODEL), {}, DATA, SPEC))
    assert card.data.base_model is None and card.data.license == "other"
    assert "- Base model: `(none: a randomly initialised transformer)`" in card.text


def test_hub_ids_and_hub_cache_snapshots(tmp_path, monkeypatch):
    """A hub id stays one; a snapshot folder in the Hub cache is named by its hub id, and the license comes from
    the README.md the cache already holds (nothing is downloaded)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--cog-2b" / "snapshots" / "abc123"
    _base_folder(snapshot, "license: apache-2.0")
    (cache / "models--org--cog-2b" / "refs").mkdir()
    (cache / "models--org--cog-2b" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for model in (str(snapshot), str(snapshot / "transformer"), "org/cog-2b"):
        (snapshot / "transformer").mkdir(exist_ok=True)
        card = ModelCard(model_card(_config(model=model), {}, DATA, SPEC))
        assert (card.data.base_model, card.data.license) == ("org/cog-2b", "apache-2.0"), model
    card = ModelCard(model_card(_config(model="org/not-cached"), {}, DATA, SPEC))
    assert (card.data.base_model, card.data.license) == ("org/not-cached", "other")


def test_hub_card_reads_from_the_repo_and_drops_a_local_base(tmp_path):
    base = _base_folder(tmp_path / "cog", "license: apache-2.0")
    lora = hub_card(model_card(_config(model=str(base), lora_rank=4), {}, DATA, SPEC), "me/cog-lora")
    card = ModelCard(lora)
    assert card.data.base_model is None and card.data.license == "apache-2.0"  # the Hub refuses a local path
    assert f"- Base model: `{base}`" in card.text and 'pipe.load_lora_weights("me/cog-lora")' in card.text
    full = hub_card(model_card(_config(model="org/cog-2b"), {}, DATA, SPEC), "me/cog-full")
    assert ModelCard(full).data.base_model == "org/cog-2b"
    assert (
        'from_pretrained("me/cog-full", subfolder="transformer", torch_dtype' in full and '"RUN' not in full
    )


@pytest.fixture(scope="module")
def finished_run(stage2_caches, tiny_cogvideox_pipeline, tmp_path_factory):
    """A finished tiny LoRA run of 4 steps from a local base pipeline folder: checkpoint-2, tensorboard/, and
    files like those a kill or a validation leaves."""
    root = tmp_path_factory.mktemp("pushed")
    base = root / "base"
    shutil.copytree(tiny_cogvideox_pipeline, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    caches = stage2_caches(6)
    align = AlignConfig(mode="moalign", layers=(1,), projector=AlignProjectorConfig(hidden_dim=16))
    cfg = Stage2Config(backbone="cogvideox", model=str(base), align=align, steps=4, batch_size=2, lr=1e-3,
                       warmup_steps=1, log_every=1, checkpoint_every=2, lora_rank=4)  # fmt: skip
    run = root / "run"
    train_stage2(caches / "latents", run, cfg, caches / "targets", progress=False)
    (run / "validation" / "step-2").mkdir(parents=True)
    (run / "validation" / "step-2" / "video_00000.mp4").write_bytes(b"mp4")
    (run / ".metrics.json.x1.tmp").write_text("{")  # an atomic write a kill interrupted
    return run


def test_push_to_hub_uploads_what_users_need_in_one_commit(finished_run, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.update(repo=(repo_id, kw)) or
                        f"https://huggingface.co/{repo_id}")  # fmt: skip
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: calls.update(
        commit=(repo_id, {op.path_in_repo: op for op in operations}, kw)))  # fmt: skip

    url = push_to_hub(finished_run, "me/cog-lora", private=True)
    assert url == "https://huggingface.co/me/cog-lora"
    assert calls["repo"] == ("me/cog-lora", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, files, kw = calls["commit"]
    assert repo_id == "me/cog-lora" and kw["commit_message"] == "moalign stage-2 run run"
    assert sorted(files) == ["README.md", "align_projector.safetensors", "config.json", "log.jsonl",
                             "loss_curve.png", "metrics.json", "pytorch_lora_weights.safetensors"]  # fmt: skip
    assert (finished_run / "checkpoint-2").is_dir() and (finished_run / "tensorboard").is_dir()  # left out
    assert files["config.json"].path_or_fileobj == str(finished_run / "config.json")  # uploaded from disk
    card = ModelCard(files["README.md"].path_or_fileobj.decode())  # the Hub's copy of the card
    assert card.data.base_model is None and card.data.license == "apache-2.0" and "lora" in card.data.tags
    assert 'pipe.load_lora_weights("me/cog-lora")' in card.text
    assert ModelCard.load(finished_run / "README.md").data.base_model == str(
        (finished_run.parent / "base").resolve()
    )

    push_to_hub(finished_run, "me/cog-lora", include=("validation/*", "checkpoint-*"))  # asked for: added
    added = set(calls["commit"][1]) - set(files)
    checkpoints = {p.relative_to(finished_run).as_posix() for p in finished_run.glob("checkpoint-*/**/*")
                   if p.is_file()}  # fmt: skip
    assert "checkpoint-2/training_state.pt" in checkpoints
    assert added == {"validation/step-2/video_00000.mp4", *checkpoints}
    assert not any(f.startswith((".", "tensorboard/")) for f in calls["commit"][1])


def test_push_to_hub_failures_are_one_line_with_the_fix(finished_run, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kw):
        raise HfHubHTTPError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\n\n"
                             "Invalid username or password.", response=SimpleNamespace(headers={}, request=None))  # fmt: skip

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(MoalignError) as err:
        push_to_hub(finished_run, "me/cog-lora")
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"could not upload {finished_run} to the Hub repo me/cog-lora: 401"
    )
    assert "hf auth login" in message and "HF_TOKEN" in message
    # no network: the HTTP library's own error (not an OSError) is caught too
    transport_error = HfHubHTTPError.__bases__[0]

    def unreachable(self, repo_id, **kw):
        raise transport_error("[Errno 101] Network is unreachable")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    with pytest.raises(MoalignError, match=r"me/cog-lora: \[Errno 101\] Network is unreachable\. Log in"):
        push_to_hub(finished_run, "me/cog-lora")
    # an unfinished run is refused before any Hub call
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps(_config()))
    save_file({}, tmp_path / "half" / "align_projector.safetensors")
    with pytest.raises(MoalignError, match="is not a finished stage-2 run"):
        push_to_hub(tmp_path / "half", "me/x")


def test_the_config_batch_is_the_global_batch():
    """The card's arithmetic: global batch = processes x accumulation steps x per-process micro-batch."""
    config = {**_config(gradient_accumulation_steps=4), "batch_size": 32}
    text = model_card(config, {"num_processes": 4}, DATA, SPEC)
    assert (
        "global batch of 32 clips per optimizer step (4 processes x 4 micro-batches of 2 clips per process)"
        in text
    )


def test_cli_push_uploads_the_run_and_fails_in_one_line(finished_run, monkeypatch, capsys):
    """`moalign push RUN --repo-id` uploads (up to the Hub call, which is stubbed) and prints the URL; an
    unfinished folder is a one-line error (exit 2)."""
    from huggingface_hub import HfApi

    from moalign.cli import main

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: calls.update(
        files=sorted(op.path_in_repo for op in operations)))  # fmt: skip
    assert main(["push", str(finished_run), "--repo-id", "me/run", "--include", "validation/*"]) == 0
    assert "https://huggingface.co/me/run" in capsys.readouterr().out
    assert "pytorch_lora_weights.safetensors" in calls["files"]
    assert "validation/step-2/video_00000.mp4" in calls["files"]
    assert main(["push", str(finished_run / "checkpoint-2"), "--repo-id", "me/run"]) == 2
    err = capsys.readouterr().err
    assert "not a finished stage-2 run" in err and len(err.strip().splitlines()) == 1

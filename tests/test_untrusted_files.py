"""Crafted pickle files run no code: every file a user may be handed is read without unpickling arbitrary objects.

Each test builds, in its own tmp_path, a malicious pickle: an object whose ``__reduce__`` makes unpickling call
``pathlib.Path.touch(MARKER)`` (or ``os.system("touch MARKER")``), saved with ``pickle.dump`` or
``torch.save`` (zip format). It is handed to moalign the way a user would hand it over, and the test asserts:

1. the marker file was NOT created (no code from the file ran), and
2. moalign stopped with a clear error: a `MoalignError` from the Python entry point, or, through
   ``moalign.cli.main``, exit status 2 and one line on stderr, without a traceback.

The files covered: the checkpoint `moalign convert-videomaev2` converts (.pth), an encoder folder's
``pytorch_model.bin`` (`VideoEncoder.from_pretrained`, ``moalign stage1 --encoder``), a checkpoint's
``training_state.pt`` (`load_training_state`, and a resume through `resolve_resume` of a checkpoint whose
checkpoint.json manifest was forged to match it), pickles under a ``.safetensors`` name (a stage-1 module file,
a cache shard, the converter's input), a diffusers transformer's ``diffusion_pytorch_model.bin`` (stage 2's
`load_transformer`) and RAFT weights (``--raft-weights``). A control test checks that the payload does run when
unpickled unsafely, so the absence of the marker means something.

`test_refusal_is_one_plain_line` checks each refusal reads as one plain line: torch.load's six-line
UnpicklingError with terminal escape codes is cut to its "WeightsUnpickler error:" line (`moalign.errors.one_line`).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil

import pytest
import torch
from conftest import tiny_transformer, tiny_videomae

from moalign.cli import main
from moalign.errors import MoalignError

# torch.load(weights_only=True) warns about a plain pickle.dump's protocol before refusing it
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

# ------------------------------------------------------------------------------------------------ payloads


class TouchPayload:
    """Unpickling it calls ``pathlib.Path.touch(marker)``."""

    def __init__(self, marker: pathlib.Path):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class ShellPayload:
    """Unpickling it runs ``touch MARKER`` in a shell (``os.system``)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def crafted_state_dict(marker: pathlib.Path, keys: tuple[str, ...] = ("weight",)) -> dict:
    """A state dict that looks ordinary (real tensors under plausible keys) plus both payloads."""
    state = {k: torch.zeros(2, 2) for k in keys}
    state["evil_touch"] = TouchPayload(marker)
    state["evil_shell"] = ShellPayload(marker)
    return state


def write_torch(path: pathlib.Path, obj) -> pathlib.Path:
    """`torch.save` in the zip format (the default for .pth / .bin / .pt files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=True)
    return path


def _crafted_model_folder(model, folder, weights_name: str, marker):
    """`model` saved with save_pretrained into `folder`, its safetensors replaced by a pickled `weights_name`
    holding the real tensors plus both payloads."""
    model.save_pretrained(folder)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    state = dict(model.state_dict())
    state["evil_touch"] = TouchPayload(marker)
    state["evil_shell"] = ShellPayload(marker)
    write_torch(folder / weights_name, state)
    return folder


def write_pickle(path: pathlib.Path, obj) -> pathlib.Path:
    """A plain `pickle.dump` (the legacy, non-zip torch format is the same thing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


@pytest.fixture
def marker(tmp_path) -> pathlib.Path:
    path = tmp_path / "MARKER"
    yield path
    # a payload that ran is a failure of the test that ran it, never a leftover for another one
    assert not path.exists(), f"code from a crafted file ran: {path} was created"


def cli_refusal(argv: list[str], capsys, marker: pathlib.Path) -> str:
    """`moalign ARGV` exits 2 with an error and no traceback, and the payload did not run; returns its stderr."""
    status = main(argv)
    err = capsys.readouterr().err
    assert not marker.exists(), f"moalign {argv[0]} ran code from a crafted file"
    assert status == 2, f"exit status {status}, stderr:\n{err}"
    assert "Traceback" not in err, err
    assert err.startswith(f"moalign {argv[0]}: error: "), err
    return err


def assert_one_plain_line(message: str) -> None:
    """What the CLI prints is one line a person reads: no line breaks, no terminal escape codes."""
    text = message.strip()
    assert "\n" not in text, f"the error spans {len(text.splitlines())} lines:\n{text}"
    assert "\x1b" not in text, f"the error holds terminal escape codes: {text!r}"


# ------------------------------------------------------------------------------------------------ control


@pytest.mark.parametrize("save", [write_pickle, write_torch], ids=["pickle", "torch.save"])
def test_payload_runs_when_unpickled_unsafely(tmp_path, save):
    """The control: both payloads do create the marker under an unrestricted unpickler, so the tests below that
    find no marker show moalign's loaders refused them, not that the payload was inert."""
    for payload in (TouchPayload, ShellPayload):
        marker = tmp_path / f"MARKER-{payload.__name__}"
        path = save(tmp_path / f"{payload.__name__}.bin", {"weight": torch.zeros(1), "x": payload(marker)})
        if save is write_pickle:
            with open(path, "rb") as f:
                pickle.load(f)
        else:
            torch.load(path, weights_only=False)
        assert marker.exists(), payload.__name__
        marker.unlink()


# ------------------------------------------------------------------------------- 1. convert-videomaev2 input


@pytest.mark.parametrize("save", [write_pickle, write_torch], ids=["pickle", "torch.save"])
def test_convert_videomaev2_refuses_crafted_pth(tmp_path, marker, capsys, save):
    """A crafted official-looking checkpoint ({'model': state dict with payloads, 'args': ...}): the CLI exits 2
    with one line naming the file, the Python entry point raises MoalignError, nothing is written, no code ran."""
    from moalign.convert_videomaev2 import convert_checkpoint, load_official_checkpoint

    keys = ("patch_embed.proj.weight", "blocks.0.norm1.weight")
    ckpt = save(tmp_path / "vit_b_k710_dl_from_giant.pth", {"model": crafted_state_dict(marker, keys)})
    out = tmp_path / "encoder"
    line = cli_refusal(["convert-videomaev2", str(ckpt), str(out)], capsys, marker)
    assert str(ckpt) in line
    assert not out.exists()
    with pytest.raises(MoalignError, match="cannot load .* safely"):
        load_official_checkpoint(ckpt)
    with pytest.raises(MoalignError):
        convert_checkpoint(ckpt, out)
    assert not out.exists()


def test_convert_videomaev2_refuses_pickle_named_safetensors(tmp_path, marker, capsys):
    """A pickle under a .safetensors name goes to the safetensors reader, which never unpickles."""
    ckpt = write_torch(
        tmp_path / "vit_b.safetensors", crafted_state_dict(marker, ("patch_embed.proj.weight",))
    )
    line = cli_refusal(["convert-videomaev2", str(ckpt), str(tmp_path / "enc")], capsys, marker)
    assert "safetensors" in line


# ------------------------------------------------------------------------------------- 2. encoder folder


@pytest.fixture
def crafted_encoder(tmp_path, marker) -> pathlib.Path:
    """A valid tiny VideoMAE folder (config.json) whose weights are a crafted pytorch_model.bin (no safetensors):
    the real tensor names, plus the payloads."""
    folder = _crafted_model_folder(
        tiny_videomae(frames=8, depth=2), tmp_path / "encoder", "pytorch_model.bin", marker
    )
    assert json.loads((folder / "config.json").read_text())["model_type"] == "videomae"
    return folder


def test_encoder_from_pretrained_refuses_crafted_bin(crafted_encoder, marker):
    from moalign.encoder import EncoderConfig, VideoEncoder

    with pytest.raises(MoalignError, match="cannot load a VideoMAE encoder") as info:
        VideoEncoder.from_pretrained(EncoderConfig(path=str(crafted_encoder), input_size=(32, 32)))
    assert str(crafted_encoder) in str(info.value)
    assert not marker.exists()


def test_stage1_refuses_crafted_encoder(crafted_encoder, tmp_path, marker, capsys):
    """`moalign stage1 --encoder` loads the encoder before reading any data: the crafted weights stop it there."""
    argv = ["stage1", "--data", str(tmp_path / "no-data"), "--encoder", str(crafted_encoder)]
    line = cli_refusal([*argv, "--out", str(tmp_path / "run"), "--quiet"], capsys, marker)
    assert str(crafted_encoder) in line


# ------------------------------------------------------------------------------------ 3. training_state.pt


def crafted_checkpoint(run_dir: pathlib.Path, marker: pathlib.Path, step: int = 3) -> pathlib.Path:
    """A checkpoint written by moalign's own writer with payloads in its training state, so checkpoint.json
    (sha256 and size of every file) matches the crafted training_state.pt: a forged, self-consistent manifest."""
    from moalign.run.checkpoint import save_training_checkpoint, verify_checkpoint

    proj = torch.nn.Linear(2, 2)
    state = {
        "scheduler": {},
        "rng": {},
        "evil_touch": TouchPayload(marker),
        "evil_shell": ShellPayload(marker),
    }
    ckpt = save_training_checkpoint(
        run_dir, step, {"motion_projector": (proj, "motion_projector", {})}, state, config={"lr": 1.0}
    )
    assert not marker.exists()  # torch.save pickles the payload; only unpickling would run it
    assert verify_checkpoint(ckpt) is True  # the manifest vouches for the crafted file
    return ckpt


@pytest.mark.parametrize("save", [write_pickle, write_torch], ids=["pickle", "torch.save"])
def test_load_training_state_refuses_crafted_file(tmp_path, marker, save):
    """The loader itself, whatever (if any) manifest is beside it."""
    from moalign.run.checkpoint import load_training_state

    ckpt = tmp_path / "run" / "checkpoint-3"
    save(ckpt / "training_state.pt", {"step": 3, "scheduler": {}, "evil": TouchPayload(marker)})
    with pytest.raises(MoalignError, match="training_state.pt") as info:
        load_training_state(ckpt)
    assert str(ckpt) in str(info.value)
    assert not marker.exists()


def test_resume_of_forged_checkpoint_runs_no_code(tmp_path, marker):
    """A checkpoint whose manifest verifies (`resolve_resume` picks it, explicitly and as "latest"), then the
    resume itself (`restore_training_state`, as stage 1 and 2 call it) refuses the training state."""
    from moalign.run.checkpoint import resolve_resume, restore_training_state

    run_dir = tmp_path / "run"
    ckpt = crafted_checkpoint(run_dir, marker)
    assert resolve_resume(run_dir, "latest", {"lr": 1.0}) == ckpt
    assert resolve_resume(run_dir, str(ckpt), {"lr": 1.0}) == ckpt
    assert not marker.exists()
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(MoalignError, match="training_state.pt"):
        restore_training_state(ckpt, optimizer, scheduler)
    assert not marker.exists()


# ------------------------------------------------------------------------------ 4. pickles as .safetensors


@pytest.mark.parametrize("save", [write_pickle, write_torch], ids=["pickle", "torch.save"])
def test_module_file_refuses_pickle_named_safetensors(tmp_path, marker, save):
    """A stage-1 `motion_projector.safetensors` that is really a pickle, as a file and inside a checkpoint."""
    from moalign.run.checkpoint import load_module_file

    path = save(tmp_path / "motion_projector.safetensors", crafted_state_dict(marker))
    with pytest.raises(MoalignError, match="not a readable safetensors file") as info:
        load_module_file(path, "motion_projector")
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_module_file_in_forged_checkpoint_runs_no_code(tmp_path, marker):
    """A checkpoint whose motion_projector.safetensors is replaced by a pickle and whose manifest is rewritten to
    match: it resolves, and loading the module (what stage 1's resume does first) refuses it."""
    from moalign.run.checkpoint import load_module_file, resolve_resume, write_checkpoint_manifest

    run_dir = tmp_path / "run"
    ckpt = crafted_checkpoint(run_dir, marker)
    write_pickle(ckpt / "motion_projector.safetensors", crafted_state_dict(marker))
    write_checkpoint_manifest(ckpt, 3, {"lr": 1.0})
    assert resolve_resume(run_dir, "latest", {"lr": 1.0}) == ckpt
    with pytest.raises(MoalignError, match="not a readable safetensors file"):
        load_module_file(ckpt / "motion_projector.safetensors", "motion_projector")
    assert not marker.exists()


def test_cache_shard_refuses_pickle(tmp_path, marker):
    """A cache shard replaced by a pickle, with the manifest's sha256 and size forged to match it (and with them
    removed, as in caches written before shards were hashed): reading an item refuses the shard."""
    from moalign.data.cache import Cache
    from moalign.data.cache_writer import CacheWriter
    from moalign.run.digest import file_sha256

    root = tmp_path / "cache"
    w = CacheWriter(root, "flow", {"clips": 2}, 2, shard_size=2)
    for s in w.shards_todo():
        w.write_shard(s, {i: {"flow": torch.zeros(2, 4, 4, 2)} for i in w.items_of(s)})
    w.finalize()
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    (name,) = manifest["shards"]
    write_torch(root / name, crafted_state_dict(marker, ("0/flow", "1/flow")))
    manifest["shard_sha256"] = {name: file_sha256(root / name)}
    manifest["shard_bytes"] = {name: (root / name).stat().st_size}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(MoalignError, match="not a readable cache shard") as info:
        Cache(root, "flow")[0]
    assert name in str(info.value)
    for key in ("shard_sha256", "shard_bytes"):
        manifest.pop(key)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(MoalignError, match="not a readable cache shard"):
        Cache(root, "flow")[1]
    assert not marker.exists()


# ------------------------------------------------------------------------------ 5. diffusers transformer


def test_load_transformer_refuses_crafted_bin(tmp_path, marker):
    """A CogVideoX transformer folder (valid tiny config.json) whose only weights are a crafted
    diffusion_pytorch_model.bin, loaded as stage 2 loads its model (as a transformer folder and as a pipeline
    folder's transformer/)."""
    from moalign.backbones import get_backbone

    folder = _crafted_model_folder(
        tiny_transformer("cogvideox"), tmp_path / "transformer", "diffusion_pytorch_model.bin", marker
    )
    spec = get_backbone("cogvideox")
    with pytest.raises(MoalignError, match="cannot load the CogVideoXTransformer3DModel") as info:
        spec.load_transformer(str(folder))
    assert "\n" not in str(info.value)
    assert not marker.exists()
    pipeline = tmp_path / "pipeline"
    shutil.copytree(folder, pipeline / "transformer")
    with pytest.raises(MoalignError, match="cannot load the CogVideoXTransformer3DModel"):
        spec.load_transformer(str(pipeline))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- RAFT weights


def test_raft_weights_refuse_crafted_pth(tmp_path, marker):
    """`--raft-weights` files are read by `moalign.data.flow._load_state_dict` (weights_only=True); the RAFT
    class needs torchvision, so the reader is called directly."""
    from moalign.data.flow import _load_state_dict

    for name in ("raft_large.pth", "raft_large.safetensors"):
        path = write_torch(tmp_path / name, crafted_state_dict(marker))
        with pytest.raises(MoalignError, match="cannot read RAFT weights"):
            _load_state_dict(path)
        assert not marker.exists()


# ------------------------------------------------------------------------------- stage 1 resume, end to end


def test_stage1_resume_from_forged_checkpoint_runs_no_code(stage1_run, tmp_path, marker):
    """A finished stage-1 run whose checkpoint-3/training_state.pt is replaced by a crafted one and whose
    checkpoint.json is rewritten to match: `train_stage1(..., resume=checkpoint-3)` verifies it, loads the
    heads, then refuses the training state before any step."""
    from moalign.run.checkpoint import write_checkpoint_manifest
    from moalign.stage1 import train_stage1

    run = tmp_path / "run"
    shutil.copytree(stage1_run.folder, run)
    ckpt = run / "checkpoint-3"
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    write_torch(ckpt / "training_state.pt", {**state, "evil": TouchPayload(marker)})
    config = json.loads((run / "config.json").read_text())["config"]
    write_checkpoint_manifest(ckpt, 3, config)
    with pytest.raises(MoalignError, match="training_state.pt"):
        train_stage1(stage1_run.data, run, stage1_run.cfg, resume=str(ckpt), progress=False)
    assert not marker.exists()


# ------------------------------------------------------------------------- the refusal is one plain line


def _message(call) -> str:
    with pytest.raises(MoalignError) as info:
        call()
    return str(info.value)


def _convert_pth(tmp_path, marker, capsys) -> str:
    ckpt = write_torch(
        tmp_path / "vit.pth", {"model": crafted_state_dict(marker, ("patch_embed.proj.weight",))}
    )
    return cli_refusal(["convert-videomaev2", str(ckpt), str(tmp_path / "enc")], capsys, marker)


def _convert_safetensors(tmp_path, marker, capsys) -> str:
    ckpt = write_torch(tmp_path / "vit.safetensors", crafted_state_dict(marker, ("patch_embed.proj.weight",)))
    return cli_refusal(["convert-videomaev2", str(ckpt), str(tmp_path / "enc")], capsys, marker)


def _stage1_encoder(tmp_path, marker, capsys) -> str:
    folder = tmp_path / "encoder"
    tiny_videomae(frames=8, depth=2).save_pretrained(folder)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    write_torch(folder / "pytorch_model.bin", crafted_state_dict(marker))
    argv = [
        "stage1",
        "--data",
        str(tmp_path / "no-data"),
        "--encoder",
        str(folder),
        "--out",
        str(tmp_path / "o"),
    ]
    return cli_refusal(argv, capsys, marker)


def _training_state(tmp_path, marker, capsys) -> str:
    from moalign.run.checkpoint import load_training_state

    write_torch(tmp_path / "checkpoint-3" / "training_state.pt", crafted_state_dict(marker))
    return _message(lambda: load_training_state(tmp_path / "checkpoint-3"))


def _module_file(tmp_path, marker, capsys) -> str:
    from moalign.run.checkpoint import load_module_file

    path = write_torch(tmp_path / "motion_projector.safetensors", crafted_state_dict(marker))
    return _message(lambda: load_module_file(path, "motion_projector"))


def _transformer(tmp_path, marker, capsys) -> str:
    from moalign.backbones import get_backbone

    folder = tmp_path / "transformer"
    tiny_transformer("cogvideox").save_pretrained(folder)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    write_torch(folder / "diffusion_pytorch_model.bin", crafted_state_dict(marker))
    return _message(lambda: get_backbone("cogvideox").load_transformer(str(folder)))


def _raft(tmp_path, marker, capsys) -> str:
    from moalign.data.flow import _load_state_dict

    path = write_torch(tmp_path / "raft_large.pth", crafted_state_dict(marker))
    return _message(lambda: _load_state_dict(path))


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param(_convert_pth, id="convert-videomaev2-pth"),
        pytest.param(_convert_safetensors, id="convert-videomaev2-safetensors"),
        pytest.param(_stage1_encoder, id="stage1-encoder"),
        pytest.param(_training_state, id="training-state"),
        pytest.param(_module_file, id="module-file"),
        pytest.param(_transformer, id="transformer"),
        pytest.param(_raft, id="raft-weights"),
    ],
)
def test_refusal_is_one_plain_line(refusal, tmp_path, marker, capsys):
    """The error that stops a crafted file is one plain line (what the CLI prints after `moalign CMD: error:`)."""
    assert_one_plain_line(refusal(tmp_path, marker, capsys))

"""The command line: every subcommand has --help; input errors exit 2 with a message naming the problem."""

import json
import subprocess
import sys

import pytest

from moalign.cli import build_parser, main

SUBCOMMANDS = [
    "demo",
    "study",
    "probe",
    "export-lora",
    "push",
    "config",
    "synth",
    "check-data",
    "flow",
    "convert-videomaev2",
    "pretrain-encoder",
    "stage1",
    "stage2",
    "generate",
    "judge",
    "evaluate",
    "latents",
    "targets",
    "precompute",
]


def test_every_subcommand_has_help(capsys):
    registered = build_parser()._subparsers._group_actions[0].choices
    assert sorted(registered) == sorted(SUBCOMMANDS)  # a new command is listed here too
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([name, "--help"])
        assert exc.value.code == 0
        assert "usage: moalign " + name in capsys.readouterr().out


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "moalign.cli", "--help"], capture_output=True, text=True, check=True
    )
    for name in SUBCOMMANDS:
        assert name in out.stdout


def test_config_lists_presets(capsys):
    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "cogvideox-2b" in out


def test_config_applies_set_to_the_whole_recipe(capsys):
    """`moalign config --set stage2.lr=...` without --part shows the override (it was silently ignored)."""
    assert main(["config", "--set", "stage2.lr=0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["stage2"]["lr"] == 0.5
    assert main(["config"]) == 0
    assert json.loads(capsys.readouterr().out)["stage2"]["lr"] != 0.5
    assert main(["config", "--set", "nosuchfield=1"]) == 2
    assert "unknown config field 'nosuchfield'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (
            ["stage1", "--data", "/nonexistent/data", "--out", "/tmp/x", "--encoder", "/nonexistent/enc"],
            "/nonexistent",
        ),
        (["synth", "--out", "/tmp/moalign-x", "--num-frames", "16"], "4k\\+1"),
        (["stage1", "--data", "d", "--out", "o", "--set", "bogus=1"], "unknown config field"),
        (["convert-videomaev2", "/nonexistent/ckpt.pth", "/tmp/moalign-out"], "ckpt.pth"),
        (["demo", "--out", "/tmp/moalign-x", "--set", "demo.base.vae_window=13"], "8k\\+1"),
        (["demo", "--out", "/tmp/moalign-x", "--set", "demo.nope=1"], "unknown config field"),
    ],
)
def test_input_errors_exit_2_with_message(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert __import__("re").search(match, err), err


def test_judge_command_on_playground_clips(tmp_path, capsys):
    from moalign.playground.scenes import SynthConfig
    from moalign.playground.synth import write_playground

    write_playground(tmp_path / "v", SynthConfig(num_clips=4), progress=False)
    assert main(["judge", "--videos", str(tmp_path / "v")]) == 0
    assert "SA 1.000" in capsys.readouterr().out and (tmp_path / "v" / "judge.json").is_file()
    assert main(["judge", "--videos", str(tmp_path / "missing")]) == 2


def test_stage2_on_the_demos_caches_takes_the_demos_preset(tmp_path):
    """Latents made with `moalign demo`'s base model (a folder of no preset's name) train with that preset's
    recipe, as --help says, not the family's 2B recipe (bf16, batch 32)."""
    import json

    import torch

    from moalign.cli import _cache_preset
    from moalign.data.cache_writer import CacheWriter
    from moalign.presets import get_preset

    base = get_preset("tiny").demo.base
    model = tmp_path / "runs" / "demo" / "base" / "init"
    (model / "transformer").mkdir(parents=True)
    config = {"num_layers": base.num_layers, "num_attention_heads": base.num_attention_heads,
              "attention_head_dim": base.attention_head_dim, "patch_size": base.patch_size}  # fmt: skip
    (model / "transformer" / "config.json").write_text(json.dumps(config))
    w = CacheWriter(tmp_path / "latents", "latents", {"model": str(model), "backbone": "cogvideox"}, 1)
    w.write_shard(0, {0: {"latents": torch.zeros(1)}})
    w.finalize()
    name, why = _cache_preset(str(tmp_path / "latents"))
    assert name == "tiny" and "playground base model" in why
    (model / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 30}))  # another model
    assert _cache_preset(str(tmp_path / "latents"))[0] == "cogvideox-2b"

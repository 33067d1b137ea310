"""Flags bound to config fields (src/moalign/run/arguments.py `bind`): each is the matching `--set`, `--set` wins,
choices come from the registries, `moalign generate` takes its settings from GenerateConfig and presets."""

import json

import pytest

from moalign.alignment import ALIGN_MODES
from moalign.backbones import BACKBONES
from moalign.backbones.spec import DTYPES
from moalign.cli import _stage_config, build_parser, main
from moalign.data.flow import FLOW_METHODS
from moalign.generate import GenerateConfig
from moalign.presets import PRESETS, get_preset


def _config(argv: list[str], part: str):
    return _stage_config(build_parser().parse_args(argv), part)


DATA_FLAGS = ["--num-frames", "9", "--height", "32", "--width", "48", "--fps", "4", "--skip-bad-videos",
              "--caption-column", "prompt, short", "--video-column", "file_name"]  # fmt: skip
DATA_SETS = [
    "data.num_frames=9",
    "data.height=32",
    "data.width=48",
    "data.fps=4.0",
    "data.skip_bad_videos=True",
    "data.caption_column=prompt, short",
    "data.video_column=file_name",
]

# command line without the bound flags, the recipe part it configures, the bound flags, the same as --set
BOUND = {
    "synth": (
        ["synth", "--out", "o"], "synth",
        ["--num-clips", "5", "--seed", "3", "--num-frames", "9", "--height", "32", "--width", "48",
         "--fps", "4", "--motions", "roll,static"],
        ["num_clips=5", "seed=3", "num_frames=9", "height=32", "width=48", "fps=4.0", "motions=['roll', 'static']"],
    ),
    "flow": (["flow", "--data", "d", "--out", "o"], "stage1", DATA_FLAGS, DATA_SETS),
    "precompute": (["precompute", "--data", "d", "--out", "o"], "stage1", DATA_FLAGS, DATA_SETS),
    "latents": (["latents", "--data", "d", "--model", "m", "--out", "o"], "stage1", DATA_FLAGS, DATA_SETS),
    "targets": (
        ["targets", "--data", "d", "--teacher", "t", "--out", "o"], "stage1", ["--skip-bad-videos"],
        ["data.skip_bad_videos=True"],
    ),
    "pretrain-encoder": (
        ["pretrain-encoder", "--data", "d", "--out", "o"], "pretrain", ["--steps", "7", *DATA_FLAGS],
        ["steps=7", *DATA_SETS],
    ),
    "stage1": (
        ["stage1", "--data", "d", "--out", "o"], "stage1",
        ["--steps", "7", "--flow-method", "farneback", *DATA_FLAGS],
        ["steps=7", "flow_method=farneback", *DATA_SETS],
    ),
    "stage2": (
        ["stage2", "--latents", "l", "--out", "o"], "stage2",
        ["--align", "trd", "--lambda", "0.25", "--tau", "3", "--margin", "0.2", "--layers", "0,2",
         "--lora-rank", "4", "--backbone", "wan", "--model", "some/model", "--steps", "7"],
        ["align.mode=trd", "align.lam=0.25", "align.tau=3.0", "align.margin=0.2", "align.layers=0,2",
         "lora_rank=4", "backbone=wan", "model=some/model", "steps=7"],
    ),
    "generate": (
        ["generate", "--model", "m", "--prompts", "p", "--out", "o"], "generate",
        ["--num-frames", "9", "--height", "32", "--width", "48", "--steps", "3", "--guidance-scale", "2.5",
         "--seed", "11", "--fps", "12"],
        ["num_frames=9", "height=32", "width=48", "steps=3", "guidance_scale=2.5", "seed=11", "fps=12.0"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("command", list(BOUND))
def test_bound_flags_are_their_set_overrides(command):
    argv, part, flags, sets = BOUND[command]
    by_flags = _config(argv + flags, part)
    by_sets = _config(argv + [a for s in sets for a in ("--set", s)], part)
    assert by_flags == by_sets
    baseline = _config(argv, part)
    for item in sets:  # every flag changed its field (the values differ from the defaults)
        alone = _config(argv + ["--set", item], part)
        assert alone != baseline, f"{item} is the default: the test cannot see its flag"


@pytest.mark.parametrize("command", ["stage1", "stage2", "pretrain-encoder"])
def test_set_wins_over_a_bound_flag(command):
    argv, part, _, _ = BOUND[command]
    assert _config(argv + ["--steps", "5", "--set", "steps=9"], part).steps == 9
    assert _config(argv + ["--set", "steps=9", "--steps", "5"], part).steps == 9


@pytest.mark.parametrize(
    ("argv", "valid"),
    [
        (["stage2", "--latents", "l", "--out", "o", "--align", "foo"], ALIGN_MODES),
        (["stage2", "--latents", "l", "--out", "o", "--backbone", "foo"], BACKBONES),
        (["generate", "--model", "m", "--prompts", "p", "--out", "o", "--backbone", "foo"], BACKBONES),
        (["latents", "--data", "d", "--model", "m", "--out", "o", "--backbone", "foo"], BACKBONES),
        (["stage1", "--data", "d", "--out", "o", "--flow-method", "foo"], ["auto", *FLOW_METHODS]),
        (["flow", "--data", "d", "--out", "o", "--method", "foo"], FLOW_METHODS),
        (["precompute", "--data", "d", "--out", "o", "--flow", "foo"], FLOW_METHODS),
        (["generate", "--model", "m", "--prompts", "p", "--out", "o", "--dtype", "foo"], DTYPES),
        (["stage1", "--data", "d", "--out", "o", "--preset", "foo"], PRESETS),
        (["config", "--part", "foo"], ["synth", "pretrain", "stage1", "stage2", "demo", "generate"]),
    ],
)
def test_invalid_choice_exits_2_listing_the_valid_ones(argv, valid, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'foo'" in err
    for name in valid:
        assert repr(name) in err, (name, err)


def test_dtype_choices_are_what_parse_dtype_accepts():
    from moalign.backbones.spec import parse_dtype

    assert all(parse_dtype(name) is not None for name in DTYPES)


GENERATE = ["generate", "--model", "m", "--prompts", "p", "--out", "o"]


def test_generate_defaults_and_presets():
    assert _config(GENERATE, "generate") == GenerateConfig() == GenerateConfig(49, 480, 720, 50, 6.0, 8.0, 0)
    wan = _config(GENERATE + ["--preset", "wan2.1-1.3b"], "generate")
    assert wan == get_preset("wan2.1-1.3b").generate == GenerateConfig(81, 480, 832, 50, 5.0, 16.0, 0)
    assert _config(GENERATE + ["--preset", "wan2.1-1.3b", "--num-frames", "9"], "generate").num_frames == 9
    assert _config(GENERATE + ["--preset", "tiny"], "generate") == GenerateConfig(17, 64, 64, 25, 1.0, 8.0, 0)


def test_generate_command_passes_its_config_to_generate(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("moalign.generate.generate", lambda *args, **kwargs: calls.append(kwargs) or [])
    (tmp_path / "prompts.txt").write_text("a ball\n")
    argv = [
        "generate",
        "--model",
        "m",
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv + ["--preset", "wan2.1-1.3b", "--steps", "3", "--set", "seed=4", "--device", "cpu"]) == 0
    kwargs = calls[0]
    expected = dict(num_frames=81, height=480, width=832, steps=3, guidance_scale=5.0, fps=16.0, seed=4)
    assert {k: kwargs[k] for k in expected} == expected
    assert kwargs["dtype"] == "auto" and kwargs["device"] == "cpu"
    assert main(argv + ["--set", "steps=0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    for argv, shown in [
        (["generate", "--help"], ["(default: 49, or the --preset's)", "(default: auto)"]),
        (["flow", "--help"], ["(default: dis)", "(default: 64)"]),
        (["stage2", "--help"], ["(default: the preset's)", "{" + ",".join(ALIGN_MODES) + "}"]),
    ]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for text in shown:
            assert text in out, (text, out)


def test_debug_works_after_the_subcommand_too():
    from moalign.cli import main
    from moalign.errors import MoalignError

    assert main(["evaluate", "--videos", "/nonexistent-folder"]) == 2  # an input error: a message, exit 2
    for argv in (["--debug", "evaluate", "--videos", "/nonexistent-folder"],
                 ["evaluate", "--videos", "/nonexistent-folder", "--debug"]):  # fmt: skip
        with pytest.raises(MoalignError, match="not a folder of videos"):
            main(argv)


@pytest.mark.parametrize("argv", [["--version"], ["stage2", "--version"], ["evaluate", "--version"]])
def test_version_anywhere(argv, capsys):
    from moalign import __version__
    from moalign.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"moalign {__version__}"


def test_help_does_not_import_torch():
    """`moalign --help` and every subcommand's --help build the parser without torch (instant), and show the
    defaults."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from moalign.cli import main\n"
        "for argv in (['--help'], ['stage2', '--help'], ['generate', '--help'], ['study', '--help']):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    assert 'usage: moalign' in out.getvalue(), argv\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_choices_mirror_the_registries():
    """The torch-free names of run/choices.py are the registries' (a new mode or preset is added in both)."""
    from dataclasses import fields

    from moalign.alignment import ALIGN_MODES
    from moalign.backbones import BACKBONES
    from moalign.backbones.spec import DTYPES
    from moalign.data.flow import FLOW_METHODS
    from moalign.playground.scenes import MOTIONS
    from moalign.presets import PRESETS, Recipe
    from moalign.run import choices
    from moalign.run.training import REPORT_TO

    assert choices.ALIGN_MODES == tuple(ALIGN_MODES) and choices.BACKBONES == tuple(BACKBONES)
    assert choices.FLOW_METHODS == tuple(FLOW_METHODS) and choices.MOTIONS == tuple(MOTIONS)
    assert choices.PRESETS == tuple(PRESETS) and choices.DTYPES == tuple(DTYPES)
    assert choices.RECIPE_PARTS == tuple(f.name for f in fields(Recipe))
    assert choices.REPORT_TO == tuple(REPORT_TO)


@pytest.mark.parametrize(
    "key, hint",
    [
        ("tau=3", "did you mean align.tau?"),
        ("learning_rate=1e-4", "did you mean lr?"),
        ("stpes=3", "did you mean steps?"),
        ("align.lamda=1", "did you mean align.lam"),
        ("data.fps=8", "stage 2 has no clip sampling: its clips are the latents cache's"),
    ],
)
def test_unknown_keys_name_the_closest_fields(key, hint, capsys):
    from moalign.cli import main

    assert main(["config", "--part", "stage2", "--set", key]) == 2
    err = capsys.readouterr().err
    assert hint in err and len(err.strip().splitlines()) == 1, err


def test_strings_are_never_split_on_commas(capsys):
    """A prompt with a comma stays one prompt, from --set, a repeatable flag or a JSON list; names lists
    (--motions) still take commas."""
    from moalign.cli import main

    def stage2(*argv):
        assert main(["config", "--part", "stage2", *argv]) == 0
        return json.loads(capsys.readouterr().out)["validation_prompts"]

    assert stage2("--set", "validation_prompts=a red ball, bouncing") == ["a red ball, bouncing"]
    assert stage2("--set", 'validation_prompts=["a red ball, bouncing", "a cube"]') == [
        "a red ball, bouncing",
        "a cube",
    ]
    assert main(["config", "--part", "synth", "--set", "motions=['roll', 'static']"]) == 0
    assert json.loads(capsys.readouterr().out)["motions"] == ["roll", "static"]


def test_config_file_yaml_json_and_partial(tmp_path, capsys):
    """--config takes YAML or JSON with some or all fields (the rest stay the preset's); flags and --set win over
    it; a bad file is one line naming it."""
    from moalign.cli import main

    (tmp_path / "a.yaml").write_text(
        "lr: 0.5\nalign:\n  tau: 3\nvalidation_prompts:\n  - a red ball, bouncing\n"
    )
    assert main(["config", "--part", "stage2", "--config", str(tmp_path / "a.yaml"), "--set", "steps=7"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["lr"], cfg["align"]["tau"], cfg["steps"]) == (0.5, 3.0, 7)
    assert (
        cfg["validation_prompts"] == ["a red ball, bouncing"] and cfg["align"]["mode"] == "moalign"
    )  # preset's
    (tmp_path / "b.json").write_text('{"lr": 0.25, "align": {"taux": 3}}')
    assert main(["config", "--part", "stage2", "--config", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "b.json" in err and "'taux': did you mean tau?" in err


def test_a_runs_config_json_goes_to_its_own_part(tmp_path, capsys):
    """A stage-2 run's config.json: whole-recipe commands put it under stage2; another part's command says which
    fields it takes, in one line."""
    from moalign.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"command": "moalign stage2 --latents c --out r",
                                                      "config": {"lr": 0.25}}))  # fmt: skip
    assert main(["config", "--config", str(tmp_path / "config.json")]) == 0
    assert json.loads(capsys.readouterr().out)["stage2"]["lr"] == 0.25
    assert main(["config", "--part", "generate", "--config", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert "is a `moalign stage2` run's config (stage2 fields); this command takes generate fields" in err
    assert len(err.strip().splitlines()) == 1

"""The `moalign` command: one subcommand per stage. Thin: pick a preset, apply a few overrides, call the stage.

Every stage takes `--preset NAME` (see `moalign config --list`) and `--set key=value` overrides on its
part of the recipe (e.g. `moalign stage1 --set lr=3e-4 --set encoder.layer=5`). A flag that sets a config
field (`--steps`, `--lambda`, `--num-frames`, ...) is declared with `bind` (`moalign/run/arguments.py`) and is a shorthand for the
matching `--set`: the bound flags are applied first, then `--set`, so `--set` wins. Choices come from the
registries (align modes, backbones, flow methods, dtypes, presets). Each subcommand's parser is built by
`_add_<name>_parser`, next to the `cmd_<name>` that runs it. Messages go through the `moalign` logger
(`moalign/run/console.py`); what a command prints as its product (`config`'s JSON) goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from moalign.errors import Interrupted, MoalignError
from moalign.generate import GenerateConfig
from moalign.run import console
from moalign.run.arguments import (
    RESUMABLE,
    HelpFormatter,
    add_cache_options,
    add_column_options,
    add_command,
    add_data_options,
    add_latents_options,
    add_training_options,
    add_version,
    bind,
    comma_list,
    command_line,
    default_device,
    flag_overrides,
    overridden,
    read_config_file,
)
from moalign.run.choices import (
    ALIGN_MODES,
    BACKBONES,
    FLOW_METHODS,
    MOTIONS,
    PRESETS,
    RECIPE_PARTS,
)

logger = console.get_logger("moalign.cli")  # not __name__: under `python -m moalign.cli` that is "__main__"
PLAYGROUND_PRESETS = (
    "tiny",
    "small",
)  # the recipes `demo` and `study` run (their playground parts are sized)

# ---- the recipe and its overrides -------------------------------------------------------------------------


def _add_preset(
    p: argparse.ArgumentParser,
    part: str,
    example: str,
    default: str | None = "tiny",
    preset_help: str = "",
    choices: tuple[str, ...] = tuple(PRESETS),
) -> None:
    """--preset and --set for a command that reads the recipe's `part` (`--set` paths are relative to it)."""
    p.add_argument(
        "--preset",
        default=default,
        choices=list(choices),
        help=preset_help or "named recipe (`moalign config --list`)",
    )
    where = "the whole recipe" if part == "recipe" else f"the preset's {part} config"
    listing = "" if part == "recipe" else f"; `moalign config --part {part}` lists the fields"
    shows = "moalign config" if part == "recipe" else f"moalign config --part {part}"
    p.add_argument(
        "--config", metavar="FILE", dest="config_file",
        help=f"YAML or JSON file of {where}'s fields (all or some, as `{shows}` prints them; a run's config.json "
        "too): applied after the preset, before the flags and --set",
    )  # fmt: skip
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a field of {where}, e.g. --set {example} (repeatable{listing}); a list of strings as "
        '--set \'validation_prompts=["a, b", "c"]\': strings are never split on commas',
    )  # fmt: skip


def _stage_config(args: argparse.Namespace, part: str, announce: bool = True):
    """The command's part of the recipe: the preset's, then the bound flags, then `--set` (the last wins); the
    preset and the clip geometry it gives are said first, so a real-data run never becomes a playground run
    silently."""
    cfg = overridden(_configured(args, part), flag_overrides(args) + args.overrides)
    data = getattr(cfg, "data", None)
    if data is not None and announce:
        logger.info(
            f"[{args.command}] preset {args.preset}: clips of {data.describe()} (--preset, --num-frames, --height, "
            "--width, --fps change them)"
        )
    return cfg


def _configured(args: argparse.Namespace, part: str):
    """The preset's `part` (or the whole recipe, part "recipe") with the --config file's fields on top; the names
    the file sets go to `args.named` (with those of the flags and --set: what the user chose)."""
    base = _recipe(args) if part == "recipe" else getattr(_recipe(args), part)
    named = {o.split("=", 1)[0].strip() for o in flag_overrides(args) + args.overrides}
    if getattr(args, "config_file", None):
        base, keys = read_config_file(args.config_file, base, part)
        named |= keys
    args.named = named
    return base


def _recipe(args: argparse.Namespace):
    """The `--preset` recipe; without one (generate's default) every field keeps its default."""
    from moalign.presets import Recipe, get_preset

    return get_preset(args.preset) if args.preset is not None else Recipe()


# ---- subcommands: each parser beside the function that runs it -------------------------------------------


def _add_demo_parser(sub) -> None:
    p = add_command(sub, "demo", cmd_demo, "run the pipeline end to end on the synthetic physics playground")
    p.add_argument("--out", default="runs/demo", help="demo folder (re-running resumes finished steps)")
    _add_preset(
        p,
        "recipe",
        "stage1.steps=500 --set demo.arm_training.steps=100",
        preset_help="tiny (2 CPU cores, minutes) or small (a GPU)",
        choices=PLAYGROUND_PRESETS,
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_demo(args: argparse.Namespace) -> None:
    from moalign.playground.demo import run_demo

    recipe = overridden(_configured(args, "recipe"), args.overrides)  # whole-recipe keys: stage1.steps=500
    run_demo(args.out, preset=args.preset, progress=not args.quiet, recipe=recipe)


def _add_study_parser(sub) -> None:
    p = add_command(
        sub, "study", cmd_study, "does the alignment help? arms x seeds on the playground, with intervals",
        description="Fine-tune every arm from the demo's base model with several seeds, judge and measure the "
        "videos, probe the transformers, and compare each arm with `none` (intervals over seeds and prompts). "
        "Report: OUT/study/report.md (docs/study.md).",
    )  # fmt: skip
    p.add_argument(
        "--out", default="runs/study", help="study folder; a finished demo folder is reused (resumable)"
    )
    bind(
        p, "--arms", "study.arms", type=comma_list,
        help="comma-separated align modes with none, or 'all' (default: none,trd,moalign)",
    )  # fmt: skip
    bind(p, "--seeds", "study.seeds", type=comma_list, help="comma-separated training seeds (default: 0,1,2)")
    bind(p, "--from-scratch", "study.from_scratch", action="store_const", const="true",
         help="train every arm from the same random init (REPA's setting; default: from the base model)")  # fmt: skip
    _add_preset(
        p, "recipe", "study.eval_clips=16", preset_help="tiny (2 CPU cores) or small (a GPU)",
        choices=PLAYGROUND_PRESETS,
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_study(args: argparse.Namespace) -> None:
    from moalign.playground.study import ALL_ARMS, run_study

    if args.arms == ["all"]:
        args.arms = list(ALL_ARMS)
    recipe = overridden(_configured(args, "recipe"), flag_overrides(args) + args.overrides)
    run_study(args.out, preset=args.preset, progress=not args.quiet, recipe=recipe)


def _add_config_parser(sub) -> None:
    p = add_command(sub, "config", cmd_config, "print a preset's resolved configuration as JSON")
    _add_preset(p, "recipe", "stage2.lr=1e-4", preset_help="named recipe (default: tiny)")
    p.add_argument("--part", choices=list(RECIPE_PARTS), help="only this stage's config")
    p.add_argument("--list", action="store_true", help="list the presets")


def cmd_config(args: argparse.Namespace) -> None:
    from moalign.presets import PRESETS
    from moalign.run.serialize import to_dict

    if args.list:
        for name, fn in PRESETS.items():
            print(f"{name:14s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return
    cfg = (
        _stage_config(args, args.part, announce=False)
        if args.part
        else overridden(_configured(args, "recipe"), args.overrides)
    )
    print(json.dumps(to_dict(cfg), indent=2))


def _add_synth_parser(sub) -> None:
    p = add_command(
        sub, "synth", cmd_synth, "write synthetic physics clips with exact optical flow and captions"
    )
    p.add_argument("--out", required=True, help="output folder (metadata.jsonl, videos/, flow/)")
    bind(p, "--num-clips", "num_clips", type=int, help="number of clips")
    bind(p, "--seed", "seed", type=int, help="global seed (same seed, same bytes)")
    bind(p, "--num-frames", "num_frames", type=int, help="frames per clip, 4k+1")
    bind(p, "--height", "height", type=int, help="frame height, divisible by 16")
    bind(p, "--width", "width", type=int, help="frame width, divisible by 16")
    bind(p, "--fps", "fps", type=float, help="frame rate written to the mp4 files")
    bind(p, "--motions", "motions", type=comma_list, help=f"comma-separated scene mix of {','.join(MOTIONS)}")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_preset(p, "synth", "num_clips=64")


def cmd_synth(args: argparse.Namespace) -> None:
    from moalign.playground.synth import write_playground

    rows = write_playground(args.out, _stage_config(args, "synth"), progress=not args.quiet)
    logger.info(
        f"[synth] wrote {len(rows)} clips to {args.out} (manifest: {Path(args.out) / 'metadata.jsonl'})"
    )


def _precompute(args: argparse.Namespace, out, done: str, announce: bool = True, data=None, **parts) -> None:
    """Run `moalign.precompute` for this process's share (under `accelerate launch`, one of several); `announce`:
    say the preset's clip geometry (not for `targets`, which cuts clips as its teacher does, and says so); `data`:
    the clip config when the caller resolved it."""
    from moalign.precompute import precompute, process_share

    share = process_share(args.device)
    data = data or _stage_config(args, "stage1", announce=announce).data
    precompute(
        args.data, out, data=data, shard_size=args.shard_size,
        overwrite=args.overwrite, progress=not args.quiet, share=share, **parts,
    )  # fmt: skip
    if share.is_main:
        logger.info(done)


def _add_flow_parser(sub) -> None:
    p = add_command(sub, "flow", cmd_flow, "precompute optical flow for a dataset into a sharded cache")
    p.add_argument(
        "--data", required=True, help="dataset folder (metadata.jsonl/csv, prompts.txt + videos.txt)"
    )
    p.add_argument("--out", required=True, help=RESUMABLE)
    p.add_argument(
        "--method", default="dis", choices=list(FLOW_METHODS),
        help="dis: CPU; raft: GPU, needs --raft-weights; exact: the playground's ground truth",
    )  # fmt: skip
    p.add_argument("--raft-weights", help="local RAFT weights file (raft only)")
    add_cache_options(p)
    _add_preset(p, "stage1", "data.fps=8")
    add_data_options(p)


def cmd_flow(args: argparse.Namespace) -> None:
    done = f"[flow] {args.method} flow of {args.data} in {args.out}"
    _precompute(args, {"flow": Path(args.out)}, done, flow=args.method, raft_weights=args.raft_weights)


def _add_convert_parser(sub) -> None:
    p = add_command(
        sub, "convert-videomaev2", cmd_convert,
        "convert an official VideoMAEv2 .pth into a transformers VideoMAEModel folder",
    )  # fmt: skip
    p.add_argument("checkpoint", help="official checkpoint (.pth or .safetensors), pretrain or finetune")
    p.add_argument("out_dir", help="output folder for VideoMAEModel.from_pretrained")
    p.add_argument("--num-heads", type=int, help="attention heads (default: from the checkpoint's name)")
    p.add_argument("--eps", type=float, help="LayerNorm eps (default 1e-6, VideoMAEv2's value)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def cmd_convert(args: argparse.Namespace) -> None:
    from moalign.convert_videomaev2 import convert_checkpoint

    report = convert_checkpoint(
        args.checkpoint,
        args.out_dir,
        num_heads=args.num_heads,
        layer_norm_eps=args.eps,
        overwrite=args.overwrite,
    )
    logger.info(json.dumps(report, indent=2, default=str))
    logger.info(
        f"[convert-videomaev2] wrote {args.out_dir}: load it with VideoMAEModel.from_pretrained or --encoder"
    )


def _add_pretrain_encoder_parser(sub) -> None:
    p = add_command(
        sub, "pretrain-encoder", cmd_pretrain_encoder,
        "pretrain a small VideoMAE (masked autoencoding) on a dataset",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument(
        "--out", required=True, help="encoder folder to write (VideoMAEModel.from_pretrained loads it)"
    )
    bind(p, "--steps", "steps", type=int, help="training steps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_preset(p, "pretrain", "steps=200")
    add_data_options(p)


def cmd_pretrain_encoder(args: argparse.Namespace) -> None:
    from moalign.playground.pretrain_encoder import pretrain_encoder

    cfg = _stage_config(args, "pretrain")
    pretrain_encoder(args.data, args.out, cfg, progress=not args.quiet, command=command_line())


def _add_check_data_parser(sub) -> None:
    p = add_command(
        sub, "check-data", cmd_check_data, "read a whole dataset once and report every problem, with counts",
        description="Probes every video of a dataset (any layout: docs/data.md) for the clip config a run would "
        "use and reports unreadable, too-short, small, badly cropped and duplicate videos and missing captions, "
        "with counts and what a run would drop; writes OUT/check_data.json and OUT/contact_sheet.png. Exit "
        "status 1 when a run with these settings would stop.",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument(
        "--out", help="folder for check_data.json and contact_sheet.png (default: runs/check-data/NAME)"
    )
    p.add_argument("--sample", type=int, default=16, help="clips on the contact sheet (0: none)")
    p.add_argument("--examples", type=int, default=3, help="clips named per problem in the printed report")
    _add_preset(p, "stage1", "data.fps=8")
    add_data_options(p)


def cmd_check_data(args: argparse.Namespace) -> int:
    from moalign.data.check import check_dataset, format_report

    data = _stage_config(args, "stage1").data
    out = Path(args.out) if args.out else Path("runs") / "check-data" / Path(args.data).resolve().name
    report = check_dataset(args.data, data, out, sample=args.sample)
    for line in format_report(report, examples=args.examples):
        logger.info(f"[check-data] {line}")
    return 1 if report["run_stops"] else 0


def _add_stage1_parser(sub) -> None:
    p = add_command(
        sub,
        "stage1",
        cmd_stage1,
        "learn the motion subspace M_psi with flow supervision on the frozen encoder",
    )
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--encoder", help="encoder folder (pretrain-encoder or convert-videomaev2 output)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--flow-cache", help="a `moalign flow` cache of this dataset (else flow is computed here)")
    bind(
        p, "--flow-method", "flow_method", choices=["auto", *FLOW_METHODS],
        help="flow computed here (no --flow-cache); auto: exact if the manifest has flow, else dis",
    )  # fmt: skip
    bind(p, "--steps", "steps", type=int, help="training steps")
    p.add_argument("--resume", help="'latest' or a checkpoint-N folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_preset(p, "stage1", "lr=3e-4 --set data.fps=8")
    add_training_options(p, "stage1")
    add_data_options(p)


def cmd_stage1(args: argparse.Namespace) -> None:
    from moalign.stage1 import train_stage1

    cfg = _stage_config(args, "stage1")
    if args.encoder:  # a path, applied after --set as before (it wins over --set encoder.path)
        cfg = replace(cfg, encoder=replace(cfg.encoder, path=str(args.encoder)))
    train_stage1(
        args.data, args.out, cfg, flow_cache=args.flow_cache, resume=args.resume, progress=not args.quiet,
        command=command_line(),
    )  # fmt: skip


def _add_stage2_parser(sub) -> None:
    p = add_command(
        sub, "stage2", cmd_stage2, "fine-tune a video DiT with diffusion + alignment loss from caches"
    )
    p.add_argument("--latents", required=True, help="cache of VAE latents and prompt embeddings")
    p.add_argument(
        "--targets", help="`moalign targets` cache of the same clips (not needed for --align none)"
    )
    p.add_argument("--out", required=True, help="run folder")
    bind(p, "--align", "align.mode", choices=list(ALIGN_MODES), help="alignment loss (the paper's: moalign)")
    bind(p, "--lambda", "align.lam", dest="lam", type=float, help="weight of the alignment loss (paper: 0.5)")
    bind(p, "--tau", "align.tau", type=float, help="temporal decay of the MoAlign loss (paper: 10)")
    bind(p, "--margin", "align.margin", type=float, help="hinge margin (default: TRD 0.1, MoAlign 0)")
    bind(
        p, "--layers", "align.layers", help="0-based block indices, e.g. 17 (the paper's 'layer 18') or 8,17"
    )
    bind(p, "--lora-rank", "lora_rank", type=int, help="LoRA rank (0: full fine-tune)")
    bind(
        p, "--lora-alpha", "lora_alpha", type=float,
        help="LoRA alpha (scale alpha/rank; default: the preset's scale kept for a new --lora-rank)",
    )  # fmt: skip
    bind(
        p, "--lora-targets", "lora_targets", type=comma_list,
        help="where the LoRA goes: attention, feed-forward (comma-separated), or module names (default: attention)",
    )  # fmt: skip
    bind(
        p,
        "--backbone",
        "backbone",
        choices=list(BACKBONES),
        help="backbone family (default: the latents cache's)",
    )
    bind(
        p, "--model", "model",
        help="diffusers pipeline or transformer folder, or hub id (default: the pipeline the latents cache was "
        "made with); tiny-random: a randomly initialised tiny transformer",
    )  # fmt: skip
    bind(p, "--steps", "steps", type=int, help="training steps")
    p.add_argument("--resume", help="'latest' or a checkpoint-N folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_preset(
        p, "stage2", "lr=1e-4 --set align.tau=10", default=None,
        preset_help="named recipe (default: the latents cache model's preset, else its family's; tiny for the "
        "playground's caches)",
    )  # fmt: skip
    add_training_options(p, "stage2")
    p.add_argument(
        "--push-to-hub", metavar="REPO_ID",
        help="when the run is finished, upload it to this Hub model repo (as `moalign push RUN --repo-id`)",
    )  # fmt: skip


def cmd_stage2(args: argparse.Namespace) -> None:
    from moalign.stage2 import train_stage2

    if args.preset is None:
        args.preset, why = _cache_preset(args.latents)
    else:
        why = "--preset"
    logger.info(f"[stage2] preset {args.preset} ({why})")
    cfg = _stage_config(args, "stage2")
    named = args.named  # the fields the user set: --config file, flags, --set
    if "model" not in named:  # the pipeline the latents were made with, not the preset's hub id
        cfg = replace(cfg, model=None)
    if "backbone" not in named and why != "--preset":
        cfg = replace(cfg, backbone=None)
    preset = _recipe(args).stage2
    if "lora_rank" in named and "lora_alpha" not in named and preset.lora_rank and preset.lora_alpha:
        # a new rank keeps the preset's scale alpha/rank (cogvideox-5b: 128/64 -> --lora-rank 32 gets alpha 16)
        cfg = replace(cfg, lora_alpha=cfg.lora_rank * preset.lora_alpha / preset.lora_rank)
    train_stage2(
        args.latents, args.out, cfg, targets_cache=args.targets, resume=args.resume, progress=not args.quiet,
        command=command_line(),
    )  # fmt: skip
    if args.push_to_hub and console.is_main_process():
        _push(args.out, args.push_to_hub)


def _add_push_parser(sub) -> None:
    p = add_command(
        sub, "push", cmd_push, "upload a finished stage-2 run to a Hugging Face Hub model repo",
        description="Uploads the weights (LoRA file or transformer/), the model card, config, metrics and loss "
        "curve in one commit; checkpoints, validation videos and tracker logs stay local unless --include names "
        "them. Authentication: HF_TOKEN, or `hf auth login` once.",
    )  # fmt: skip
    p.add_argument("run", help="finished stage-2 run folder")
    p.add_argument("--repo-id", required=True, help="user/name or org/name (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", help="commit message (default: moalign stage-2 run NAME)")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="also upload these files, e.g. 'validation/*' or 'checkpoint-*' (repeatable)")  # fmt: skip


def cmd_push(args: argparse.Namespace) -> None:
    _push(
        args.run, args.repo_id, private=args.private, commit_message=args.message, include=tuple(args.include)
    )


def _push(run: str, repo_id: str, **kwargs) -> None:
    from moalign.run.hub import push_to_hub

    url = push_to_hub(run, repo_id, **kwargs)
    logger.info(f"[push] {run} -> {url}")


# the recipe a family's stage 2 takes when its latents cache's model is none of the presets'
FAMILY_PRESETS = {"cogvideox": "cogvideox-2b", "wan": "wan2.1-1.3b"}


def _cache_preset(latents: str) -> tuple[str, str]:
    """The preset stage 2 takes without --preset, from the latents cache's model: the preset of that model (a hub
    id, or a folder of the same name), else the family's (FAMILY_PRESETS); tiny for a cache made in memory (the
    playground's). Returns (name, why)."""
    from moalign.data.cache import Cache
    from moalign.latents import LATENTS_KIND
    from moalign.presets import PRESETS

    fp = Cache(latents, kind=LATENTS_KIND).fingerprint
    model, family = str(fp.get("model") or ""), fp.get("backbone")
    if not model or model.endswith("(in memory)") or family not in FAMILY_PRESETS:
        return "tiny", f"the latents cache {latents} was made by a pipeline built in memory: the playground's"
    for name, fn in PRESETS.items():
        preset_model = fn().stage2.model
        if preset_model and Path(preset_model).name.lower() == Path(model).name.lower():
            return name, f"the latents cache's model {model} is this preset's"
    base = _playground_base_preset(model)
    if base is not None:
        return (
            base,
            f"the latents cache's model {model} is the {base} preset's playground base model (moalign demo)",
        )
    return FAMILY_PRESETS[family], (
        f"the {family} family's recipe: the latents cache's model {model} is none of the presets' (pass --preset "
        "to choose another)"
    )


def _playground_base_preset(model: str) -> str | None:
    """The preset whose playground base model (`moalign demo`'s OUT/base/init or base/pipeline) a pipeline folder
    holds, by its transformer's size (layers, heads, head width, text width); None for any other model."""
    import json

    from moalign.presets import PRESETS

    path = Path(model) / "transformer" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    shape = tuple(
        config.get(k) for k in ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size")
    )
    for name, fn in PRESETS.items():
        base = getattr(getattr(fn(), "demo", None), "base", None)
        if base is not None and shape == (base.num_layers, base.num_attention_heads, base.attention_head_dim,
                                          base.patch_size):  # fmt: skip
            return name
    return None


def _add_export_lora_parser(sub) -> None:
    p = add_command(
        sub, "export-lora", cmd_export_lora, "write a stage-2 LoRA in another key layout (ComfyUI's native one)",
        description="Convert RUN/pytorch_lora_weights.safetensors (diffusers layout) to the key layout ComfyUI "
        "loads for Wan2.1 and CogVideoX (lora_down/lora_up/alpha; docs/export.md).",
    )  # fmt: skip
    p.add_argument("run", help="stage-2 LoRA run folder")
    p.add_argument("--format", default="comfy", choices=["comfy"], help="target key layout")
    p.add_argument(
        "--out",
        help="file, or a folder for the default name (default: RUN/comfy/NAME_comfy_lora.safetensors)",
    )


def cmd_export_lora(args: argparse.Namespace) -> None:
    from moalign.run.export_lora import export_lora

    path = export_lora(args.run, fmt=args.format, out=args.out)
    logger.info(f"[export-lora] {args.format} LoRA of {args.run} -> {path}")


_GENERATE_FLAGS = {  # GenerateConfig field -> help of its flag (--num-frames for num_frames, ...)
    "num_frames": "frames, 4k+1",
    "height": "frame height",
    "width": "frame width",
    "steps": "sampling steps",
    "guidance_scale": "classifier-free guidance scale (1.0: none)",
    "seed": "video i uses seed + i",
    "fps": "frame rate of the mp4 files",
}


def _add_generate_parser(sub) -> None:
    p = add_command(
        sub, "generate", cmd_generate, "generate videos from a stage-2 run or a pipeline, one per prompt"
    )
    p.add_argument(
        "--model", required=True, help="stage-2 run folder, or a diffusers pipeline folder / hub id"
    )
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder (mp4s, metadata.jsonl, contact_sheet.png)")
    p.add_argument("--base", help="base pipeline of a run whose config names none")
    p.add_argument("--backbone", choices=list(BACKBONES), help="default: from the run or model_index.json")
    help = "take the geometry and sampler settings from this recipe's generate part (default: the ones below)"
    _add_preset(p, "generate", "steps=25", default=None, preset_help=help)
    g = p.add_argument_group("geometry and sampler (src/moalign/generate.py GenerateConfig)")
    defaults = GenerateConfig()
    for name, text in _GENERATE_FLAGS.items():
        value = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        bind(g, flag, name, type=type(value), help=f"{text} (default: {value}, or the --preset's)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    add_latents_options(p, auto=True)
    p.add_argument(
        "--cpu-offload", action="store_true",
        help="keep each model on the CPU until it runs (peak GPU memory: the largest model; CUDA only)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_generate(args: argparse.Namespace) -> None:
    from moalign.generate import generate, read_prompts

    cfg = _stage_config(args, "generate")
    cfg, where = _run_geometry(args, cfg)
    device = args.device or default_device()
    logger.info(
        f"[generate] {args.model}: {cfg.num_frames} frames at {cfg.height}x{cfg.width} ({where}), {cfg.steps} "
        f"steps, guidance {cfg.guidance_scale:g}, on {device}"
    )
    rows = generate(
        args.model, read_prompts(args.prompts), args.out, **asdict(cfg), backbone=args.backbone,
        base=args.base, device=device, dtype=args.dtype, vae_tiling=args.vae_tiling, cpu_offload=args.cpu_offload,
        progress=not args.quiet,
    )  # fmt: skip
    logger.info(f"[generate] {len(rows)} videos in {args.out} (manifest metadata.jsonl, contact_sheet.png)")


def _run_geometry(args: argparse.Namespace, cfg):
    """Without --preset, a stage-2 run's videos have the clips it trained on (its config's validation_frames and
    validation_size, which default to its latents cache's), unless --num-frames/--height/--width say otherwise.
    Returns (config, where its geometry came from)."""
    run_cfg = Path(args.model) / "config.json"
    if args.preset is not None or not run_cfg.is_file():
        return cfg, f"the preset {args.preset}'s" if args.preset else "the defaults"
    trained = json.loads(run_cfg.read_text()).get("config") or {}
    frames, size = trained.get("validation_frames"), trained.get("validation_size")
    if not frames or not size:
        return cfg, "the defaults"
    took = {"num_frames": frames, "height": size[0], "width": size[1]}
    flagged = [k for k in took if k in args.named]
    took = {k: v for k, v in took.items() if k not in args.named}
    flags = ", ".join("--" + k.replace("_", "-") for k in flagged)
    where = (
        "the flags" if not took else f"the run's clips, {flags} as given" if flagged else "the run's clips"
    )
    return replace(cfg, **took), where


def _add_judge_parser(sub) -> None:
    help = "toy VideoPhy2 judge for playground-style videos (SA, PC, Joint, motion)"
    p = add_command(sub, "judge", cmd_judge, help)
    p.add_argument(
        "--videos", required=True, help="folder with metadata.jsonl (video, caption) and the videos"
    )
    p.add_argument("--out", help="output JSON (default: VIDEOS/judge.json)")


def cmd_judge(args: argparse.Namespace) -> None:
    from moalign.playground.judge import judge_folder

    result = judge_folder(args.videos, args.out)
    agg = result["aggregate"]
    where = args.out or str(Path(args.videos) / "judge.json")
    logger.info(
        f"[judge] {agg['num_videos']} videos: SA {agg['sa']:.3f}, PC {agg['pc']:.3f}, Joint {agg['joint']:.3f}, "
        f"motion {agg['motion']:.2f} px/frame -> {where}"
    )


def _add_evaluate_parser(sub) -> None:
    p = add_command(sub, "evaluate", cmd_evaluate, "weight-free motion metrics of any folder of videos")
    p.add_argument("--videos", required=True, help="folder of videos (a manifest is optional)")
    p.add_argument("--reference", help="folder of real clips: the same metrics; Fréchet with --teacher")
    p.add_argument("--teacher", help="stage-1 run: Fréchet distances in its motion and raw encoder spaces")
    p.add_argument("--out", help="output folder (default: VIDEOS/evaluation)")
    p.add_argument(
        "--flow", default="dis", choices=[m for m in FLOW_METHODS if m != "exact"],
        help="optical flow: dis and farneback on CPU (OpenCV), raft on a GPU with --raft-weights",
    )  # fmt: skip
    p.add_argument("--raft-weights", help="local RAFT weights file (--flow raft, GPU machines)")
    p.add_argument("--device", help="for RAFT, --teacher (default: cuda when available, else cpu)")
    p.add_argument(
        "--skip-bad-videos", action="store_true",
        help="skip unreadable or too-short videos (with --teacher: too short for its clips), counted",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from moalign.evaluation.folder import evaluate_folder

    args.device = args.device or default_device()
    keys = ("reference", "teacher", "skip_bad_videos", "device", "flow", "raft_weights")
    evaluate_folder(args.videos, args.out, progress=not args.quiet, **{k: getattr(args, k) for k in keys})


def _add_probe_parser(sub) -> None:
    p = add_command(
        sub, "probe", cmd_probe, "does a stage-2 transformer hold motion? held-out loss + probe R² per block"
    )
    p.add_argument(
        "--model", required=True, help="stage-2 run folder (LoRA or full) or diffusers pipeline folder"
    )
    p.add_argument(
        "--data", required=True, help="held-out clips with exact flow files (e.g. `moalign synth`)"
    )
    p.add_argument(
        "--latents", required=True, help="`moalign latents` cache of --data (the model's pipeline)"
    )
    p.add_argument("--targets", required=True, help="`moalign targets` cache of --data (the stage-1 teacher)")
    p.add_argument("--teacher", required=True, help="the stage-1 run of --targets (its clip sampling)")
    p.add_argument(
        "--state",
        help="a full fine-tune's checkpoint: RUN/checkpoint-N (or its transformer_trainable.safetensors)",
    )
    p.add_argument("--clips", type=int, default=32, help="held-out clips (half fit the probes, half score)")
    p.add_argument("--noise-levels", default="0.25,0.5,0.75", help="fractions of the training schedule")
    p.add_argument(
        "--out",
        help="JSON file to write (default: MODEL/probes.json, or CHECKPOINT/probes.json with --state)",
    )
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_probe(args: argparse.Namespace) -> None:
    from moalign.evaluation.dit_probes import probe_inputs, probe_run
    from moalign.run.atomic import write_json
    from moalign.teacher import load_motion_teacher

    levels = tuple(float(v) for v in args.noise_levels.split(","))
    state = Path(args.state) if args.state else None
    if state is not None and state.is_dir():  # a checkpoint folder: its transformer weights
        state = state / "transformer_trainable.safetensors"
    inputs = probe_inputs(
        args.latents, args.targets, args.data, load_motion_teacher(args.teacher).data, args.clips
    )
    result = probe_run(
        args.model, inputs, state=state, device=args.device or default_device(), noise_levels=levels
    )
    result = {"model": str(args.model), "state": str(state) if state else None, **result}
    out = Path(args.out) if args.out else (state.parent if state else Path(args.model)) / "probes.json"
    write_json(out, result)
    logger.info(
        f"[probe] {result['clips']} held-out clips; diffusion loss {result['mean']['diffusion']:.4f} -> {out}"
    )
    for k, (m, f) in enumerate(zip(result["mean"]["motion_r2"], result["mean"]["flow_r2"], strict=True)):
        logger.info(f"[probe] block {k}: R² to motion tokens {m:.3f}, to flow {f:.3f}")


def _add_latents_parser(sub) -> None:
    p = add_command(sub, "latents", cmd_latents, "precompute VAE latents and prompt embeddings for stage 2")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument(
        "--model", required=True, help="diffusers pipeline folder or hub id (VAE and text encoder)"
    )
    p.add_argument(
        "--backbone",
        choices=list(BACKBONES),
        help="backbone family (default: the --model pipeline's, else the preset's)",
    )
    p.add_argument("--out", required=True, help=RESUMABLE)
    add_latents_options(p)
    add_cache_options(p)
    _add_preset(p, "stage1", "data.fps=8")
    add_data_options(p)


def _backbone(args: argparse.Namespace) -> str:
    """--backbone, else the family of the --model pipeline folder (its model_index.json), else the preset's."""
    from moalign.generate import pipeline_family

    return pipeline_family(args.model, args.backbone) or _recipe(args).stage2.backbone


def cmd_latents(args: argparse.Namespace) -> None:
    backbone = _backbone(args)
    done = f"[latents] {backbone} latents and prompt embeddings of {args.data} in {args.out}"
    _precompute(
        args, {"latents": Path(args.out)}, done, model=args.model, backbone=backbone, latents_dtype=args.dtype,
        vae_tiling=args.vae_tiling,
    )  # fmt: skip


def _add_targets_parser(sub) -> None:
    p = add_command(
        sub, "targets", cmd_targets, "precompute stage-2 teacher targets (motion tokens) for a dataset"
    )
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--teacher", required=True, help="stage-1 run folder (its motion_projector.safetensors)")
    p.add_argument("--out", required=True, help=RESUMABLE)
    p.add_argument(
        "--raw", action="store_true", help="also store the raw encoder tokens (REPA / TRD ablations)"
    )
    bind(
        p, "--skip-bad-videos", "data.skip_bad_videos", action="store_true",
        help="skip unreadable videos, counted in the cache",
    )  # fmt: skip
    add_column_options(p)
    add_cache_options(p)
    _add_preset(p, "stage1", "data.fps=8")


def cmd_targets(args: argparse.Namespace) -> None:
    done = f"[targets] teacher targets of {args.data} in {args.out}"
    _precompute(args, {"targets": Path(args.out)}, done, announce=False, teacher=args.teacher, raw=args.raw)


def _add_precompute_parser(sub) -> None:
    p = add_command(
        sub, "precompute", cmd_precompute,
        "build the training caches (flow; teacher targets; latents) in one command, split across the "
        "processes of `accelerate launch`",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument(
        "--out", required=True, help="folder for OUT/flow, OUT/targets, OUT/latents (re-run to resume)"
    )
    p.add_argument("--flow", choices=list(FLOW_METHODS), help="flow cache with this method (before stage 1)")
    p.add_argument("--raft-weights", help="local RAFT weights file (--flow raft)")
    p.add_argument("--teacher", help="stage-1 run folder: teacher targets cache (after stage 1)")
    p.add_argument(
        "--raw", action="store_true", help="targets also hold raw encoder tokens (REPA / TRD arms)"
    )
    p.add_argument("--model", help="diffusers pipeline folder or hub id: latents + prompt embeddings cache")
    p.add_argument(
        "--backbone",
        choices=list(BACKBONES),
        help="backbone family (default: the --model pipeline's, else the preset's)",
    )
    add_latents_options(p)
    add_cache_options(p)
    _add_preset(
        p, "stage1", "data.fps=8", default=None,
        preset_help="named recipe (default: with --teacher, clips cut as the teacher cuts them; else tiny)",
    )  # fmt: skip
    add_data_options(p)


def cmd_precompute(args: argparse.Namespace) -> None:
    backbone = _backbone(args)
    _precompute(
        args, args.out, f"[precompute] caches of {args.data} in {args.out}", data=_precompute_clips(args),
        flow=args.flow, raft_weights=args.raft_weights, teacher=args.teacher, raw=args.raw, model=args.model,
        backbone=backbone, latents_dtype=args.dtype, vae_tiling=args.vae_tiling,
    )  # fmt: skip


def _precompute_clips(args: argparse.Namespace):
    """precompute's clip config. With --teacher the targets are cut as the teacher cuts its clips, so without
    --preset the other caches are too (then the flags); latents of other frames than the targets' are refused
    here, before hours of encoding, as stage 2 would refuse the pair."""
    if not args.teacher:
        args.preset = args.preset or "tiny"
        return _stage_config(args, "stage1").data
    from moalign.teacher import load_motion_teacher

    teacher = load_motion_teacher(args.teacher).data
    if args.preset is None:
        args.preset = "tiny"
        base = replace(_configured(args, "stage1"), data=teacher)
        data = overridden(base, flag_overrides(args) + args.overrides).data
        logger.info(
            f"[precompute] clips as the teacher {args.teacher} cuts them: {data.describe()} (--num-frames, "
            "--height, --width, --fps change them)"
        )
    else:
        data = _stage_config(args, "stage1").data
    from moalign.data.sampling import CLIP_FRAME_FIELDS

    differ = [k for k in CLIP_FRAME_FIELDS if getattr(data, k) != getattr(teacher, k)]
    if differ and args.model:
        listing = ", ".join(f"{k} {getattr(data, k)} vs the teacher's {getattr(teacher, k)}" for k in differ)
        raise MoalignError(
            f"the latents would cut other frames than the teacher's targets ({listing}), and stage 2 refuses such a "
            "pair: drop --preset / the frame flags to cut clips as the teacher does, or make the latents separately"
        )
    return data


# ---- parser -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moalign",
        description="MoAlign: motion-centric representation alignment for video diffusion models.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for input errors too")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_demo_parser, _add_study_parser, _add_config_parser, _add_synth_parser, _add_check_data_parser, _add_flow_parser, _add_convert_parser,
        _add_pretrain_encoder_parser, _add_stage1_parser, _add_stage2_parser, _add_export_lora_parser, _add_push_parser, _add_generate_parser,
        _add_judge_parser, _add_evaluate_parser, _add_probe_parser, _add_latents_parser, _add_targets_parser, _add_precompute_parser,
    ):  # fmt: skip
        add(sub)
    return parser


_KEPT = (
    "What finished is kept (a cache's finished shards, a run's checkpoints; files are written whole or not at "
    "all): run the same command again (training: with --resume latest) to continue"
)


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM outside a training loop (which stops at its next step boundary itself) stops the command with one
    line and exit 143 instead of dying without a word; the main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted(signum, f"stopped by SIGTERM. {_KEPT}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        console.quiet_libraries()
    try:
        with _stop_on_sigterm():
            status = args.fn(args)
    except Interrupted as err:  # a training loop stopped at a step boundary, or SIGTERM elsewhere
        if args.debug:
            raise
        print(f"moalign {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (or twice inside one)
        if args.debug:
            raise
        print(f"moalign {args.command}: interrupted (SIGINT). {_KEPT}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moalign config | head`: the reader left; nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MoalignError as err:
        if args.debug:
            raise
        print(f"moalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    return status or 0  # a command may return its own exit status (check-data: 1 when a run would stop)


if __name__ == "__main__":
    sys.exit(main())

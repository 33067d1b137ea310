"""The `moalign` command: one subcommand per stage. Thin: pick a preset, apply a few overrides, call the stage.

Every stage takes `--preset NAME` (see `moalign config --list`) and `--set key=value` overrides on its
part of the recipe (e.g. `moalign stage1 --set lr=3e-4 --set encoder.layer=5`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from moalign.errors import MoalignError


def _command_line() -> str:
    return "moalign " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _add_preset(
    p: argparse.ArgumentParser,
    preset_help: str = "named recipe (default: tiny; `moalign config --list`)",
    set_help: str = "override a config field of this stage, e.g. --set steps=200 --set data.fps=8 (repeatable)",
) -> None:
    p.add_argument("--preset", default="tiny", help=preset_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clip sampling (overrides the preset's data config)")
    g.add_argument("--num-frames", type=int, help="frames per clip window, 4k+1 (e.g. 17, 49)")
    g.add_argument("--height", type=int, help="target height after resize + centre crop (divisible by 16)")
    g.add_argument("--width", type=int, help="target width after resize + centre crop (divisible by 16)")
    g.add_argument("--fps", type=float, help="sample the window at this frame rate (default: native)")
    g.add_argument(
        "--skip-bad-videos",
        action="store_true",
        help="skip unreadable or too-short videos (counted in the log) instead of stopping with an error",
    )


def _data_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for name in ("num_frames", "height", "width", "fps"):
        value = getattr(args, name, None)
        if value is not None:
            out.append(f"data.{name}={value}")
    if getattr(args, "skip_bad_videos", False):
        out.append("data.skip_bad_videos=True")
    return out


def _stage_config(args: argparse.Namespace, part: str, extra: list[str] | None = None):
    return _overridden(getattr(_recipe(args), part), (extra or []) + args.overrides)


def _overridden(cfg, overrides: list[str]):
    """`cfg` with `--set KEY=VALUE` overrides applied; a bad key or value is a user error."""
    from moalign.run.serialize import apply_overrides

    try:
        return apply_overrides(cfg, overrides)
    except (ValueError, TypeError) as err:
        raise MoalignError(f"bad configuration: {err}") from err


# ---- subcommands ------------------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> None:
    from moalign.presets import PRESETS
    from moalign.run.serialize import to_dict

    if args.list:
        for name, fn in PRESETS.items():
            print(f"{name:14s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return
    print(json.dumps(to_dict(_stage_config(args, args.part) if args.part else _recipe(args)), indent=2))


def _recipe(args: argparse.Namespace):
    from moalign.presets import get_preset

    try:
        return get_preset(args.preset)
    except ValueError as err:
        raise MoalignError(str(err)) from err


def cmd_synth(args: argparse.Namespace) -> None:
    from moalign.playground.synth import write_playground

    extra = []
    for name in ("num_clips", "seed", "num_frames", "height", "width", "fps"):
        if getattr(args, name) is not None:
            extra.append(f"{name}={getattr(args, name)}")
    if args.motions:
        extra.append(f"motions={args.motions}")
    cfg = _stage_config(args, "synth", extra)
    rows = write_playground(args.out, cfg, progress=not args.quiet)
    print(f"[synth] wrote {len(rows)} clips to {args.out} (manifest: {Path(args.out) / 'metadata.jsonl'})")


def _precompute(args: argparse.Namespace, out, done: str, **parts) -> None:
    """Run `moalign.precompute` for this process's share (under `accelerate launch`, one of several)."""
    from moalign.precompute import precompute, process_share

    share = process_share(args.device)
    precompute(
        args.data, out, data=_stage_config(args, "stage1", _data_overrides(args)).data,
        shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.quiet, share=share, **parts,
    )  # fmt: skip
    if share.is_main:
        print(done)


def cmd_precompute(args: argparse.Namespace) -> None:
    backbone = args.backbone or _recipe(args).stage2.backbone
    _precompute(
        args, args.out, f"[precompute] caches of {args.data} in {args.out}", flow=args.flow,
        raft_weights=args.raft_weights, teacher=args.teacher, raw=args.raw, model=args.model, backbone=backbone,
        latents_dtype=args.dtype, vae_tiling=args.vae_tiling,
    )  # fmt: skip


def cmd_flow(args: argparse.Namespace) -> None:
    done = f"[flow] {args.method} flow of {args.data} in {args.out}"
    _precompute(args, {"flow": Path(args.out)}, done, flow=args.method, raft_weights=args.raft_weights)


def cmd_convert(args: argparse.Namespace) -> None:
    from moalign.convert_videomaev2 import convert_checkpoint

    report = convert_checkpoint(
        args.checkpoint,
        args.out_dir,
        num_heads=args.num_heads,
        layer_norm_eps=args.eps,
        overwrite=args.overwrite,
    )
    print(json.dumps(report, indent=2, default=str))
    print(
        f"[convert-videomaev2] wrote {args.out_dir}: load it with VideoMAEModel.from_pretrained or --encoder"
    )


def cmd_pretrain_encoder(args: argparse.Namespace) -> None:
    from moalign.playground.pretrain_encoder import pretrain_encoder

    extra = _data_overrides(args) + ([f"steps={args.steps}"] if args.steps else [])
    cfg = _stage_config(args, "pretrain", extra)
    pretrain_encoder(args.data, args.out, cfg, progress=not args.quiet, command=_command_line())


def cmd_stage1(args: argparse.Namespace) -> None:
    from moalign.stage1 import train_stage1

    extra = _data_overrides(args)
    if args.steps:
        extra.append(f"steps={args.steps}")
    if args.flow_method:
        extra.append(f"flow_method={args.flow_method}")
    cfg = _stage_config(args, "stage1", extra)
    if args.encoder:
        cfg = replace(cfg, encoder=replace(cfg.encoder, path=str(args.encoder)))
    train_stage1(
        args.data,
        args.out,
        cfg,
        flow_cache=args.flow_cache,
        resume=args.resume,
        progress=not args.quiet,
        command=_command_line(),
    )


def cmd_stage2(args: argparse.Namespace) -> None:
    from moalign.stage2 import train_stage2

    extra = []
    for flag, key in (("align", "align.mode"), ("lam", "align.lam"), ("tau", "align.tau"), ("margin", "align.margin"),
                      ("layers", "align.layers"), ("lora_rank", "lora_rank"), ("steps", "steps"),
                      ("backbone", "backbone"), ("model", "model")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={value}")
    cfg = _stage_config(args, "stage2", extra)
    train_stage2(
        args.latents, args.out, cfg, targets_cache=args.targets, resume=args.resume, progress=not args.quiet,
        command=_command_line(),
    )  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> None:
    from moalign.generate import generate, read_prompts

    rows = generate(
        args.model, read_prompts(args.prompts), args.out, num_frames=args.num_frames, height=args.height,
        width=args.width, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, fps=args.fps,
        backbone=args.backbone, base=args.base, device=args.device, dtype=args.dtype, vae_tiling=args.vae_tiling,
        progress=not args.quiet,
    )  # fmt: skip
    print(f"[generate] {len(rows)} videos in {args.out} (manifest metadata.jsonl, contact_sheet.png)")


def cmd_judge(args: argparse.Namespace) -> None:
    from moalign.playground.judge import judge_folder

    result = judge_folder(args.videos, args.out)
    agg = result["aggregate"]
    where = args.out or str(Path(args.videos) / "judge.json")
    print(
        f"[judge] {agg['num_videos']} videos: SA {agg['sa']:.3f}, PC {agg['pc']:.3f}, Joint {agg['joint']:.3f}, "
        f"motion {agg['motion']:.2f} px/frame -> {where}"
    )


def cmd_latents(args: argparse.Namespace) -> None:
    backbone = args.backbone or _recipe(args).stage2.backbone
    done = f"[latents] {backbone} latents and prompt embeddings of {args.data} in {args.out}"
    _precompute(
        args, {"latents": Path(args.out)}, done, model=args.model, backbone=backbone, latents_dtype=args.dtype,
        vae_tiling=args.vae_tiling,
    )  # fmt: skip


def cmd_targets(args: argparse.Namespace) -> None:
    done = f"[targets] teacher targets of {args.data} in {args.out}"
    _precompute(args, {"targets": Path(args.out)}, done, teacher=args.teacher, raw=args.raw)


def cmd_demo(args: argparse.Namespace) -> None:
    from moalign.playground.demo import run_demo

    recipe = _overridden(_recipe(args), args.overrides)  # whole-recipe keys: stage1.steps=500
    run_demo(args.out, preset=args.preset, progress=not args.quiet, recipe=recipe)


# ---- parser -----------------------------------------------------------------------------------------------


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moalign",
        description="MoAlign: motion-centric representation alignment for video diffusion models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for input errors too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the pipeline end to end on the synthetic physics playground")
    p.add_argument("--out", default="runs/demo", help="demo folder (re-running resumes finished steps)")
    _add_preset(
        p,
        preset_help="tiny (2 CPU cores, minutes) or small (a GPU)",
        set_help="override a recipe field, e.g. --set stage1.steps=500 --set demo.arm_training.steps=100 (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("config", help="print a preset's resolved configuration as JSON")
    _add_preset(p)
    p.add_argument(
        "--part", choices=["synth", "pretrain", "stage1", "stage2", "demo"], help="only this stage's config"
    )
    p.add_argument("--list", action="store_true", help="list the presets")
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("synth", help="write synthetic physics clips with exact optical flow and captions")
    p.add_argument("--out", required=True, help="output folder (metadata.jsonl, videos/, flow/)")
    p.add_argument("--num-clips", type=int, help="number of clips")
    p.add_argument("--seed", type=int, help="global seed (same seed, same bytes)")
    p.add_argument("--num-frames", type=int, help="frames per clip, 4k+1 (default 17)")
    p.add_argument("--height", type=int, help="frame height, divisible by 16 (default 64)")
    p.add_argument("--width", type=int, help="frame width, divisible by 16 (default 64)")
    p.add_argument("--fps", type=float, help="frame rate written to the mp4 files")
    p.add_argument("--motions", help="comma-separated scene mix, e.g. bounce,throw,roll,collide,static")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_preset(p)
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("flow", help="precompute optical flow for a dataset into a sharded cache")
    p.add_argument(
        "--data", required=True, help="dataset folder (metadata.jsonl/csv or prompts.txt + videos.txt)"
    )
    p.add_argument(
        "--out", required=True, help="cache folder (resumable: re-run the same command after a stop)"
    )
    p.add_argument(
        "--method", default="dis", help="dis (CPU default), farneback, raft (GPU), exact (playground)"
    )
    p.add_argument("--raft-weights", help="local RAFT weights file (raft only)")
    _add_cache_options(p)
    _add_preset(p)
    _add_data(p)
    p.set_defaults(fn=cmd_flow)

    p = sub.add_parser(
        "convert-videomaev2",
        help="convert an official VideoMAEv2 .pth into a transformers VideoMAEModel folder",
    )
    p.add_argument(
        "checkpoint", help="official checkpoint (.pth or .safetensors), pretrain or finetune layout"
    )
    p.add_argument("out_dir", help="output folder for VideoMAEModel.from_pretrained")
    p.add_argument(
        "--num-heads", type=int, help="attention heads (default: from the checkpoint's model name)"
    )
    p.add_argument("--eps", type=float, help="LayerNorm eps (default 1e-6, VideoMAEv2's value)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser(
        "pretrain-encoder", help="pretrain a small VideoMAE (masked autoencoding) on a dataset"
    )
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument(
        "--out", required=True, help="encoder folder to write (VideoMAEModel.from_pretrained loads it)"
    )
    p.add_argument("--steps", type=int, help="training steps (overrides the preset)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_preset(p)
    _add_data(p)
    p.set_defaults(fn=cmd_pretrain_encoder)

    p = sub.add_parser(
        "stage1", help="learn the motion subspace M_psi with flow supervision on the frozen encoder"
    )
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--encoder", help="encoder folder (pretrain-encoder or convert-videomaev2 output)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--flow-cache", help="a `moalign flow` cache of this dataset (else flow is computed here)")
    p.add_argument(
        "--flow-method", help="auto (exact if the manifest has flow, else dis), dis, farneback, exact"
    )
    p.add_argument("--steps", type=int, help="training steps (overrides the preset)")
    p.add_argument("--resume", help="'latest' or a checkpoint-N folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_preset(p)
    _add_data(p)
    p.set_defaults(fn=cmd_stage1)
    p = sub.add_parser("stage2", help="fine-tune a video DiT with diffusion + alignment loss from caches")
    p.add_argument("--latents", required=True, help="cache of VAE latents and prompt embeddings")
    p.add_argument(
        "--targets", help="`moalign targets` cache of the same clips (not needed for --align none)"
    )
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--align", help="none, repa, trd, raw-moalign, motion-trd, moalign")
    p.add_argument("--lambda", dest="lam", type=float, help="weight of the alignment loss (paper: 0.5)")
    p.add_argument("--tau", type=float, help="temporal decay of the MoAlign loss (paper: 10)")
    p.add_argument("--margin", type=float, help="hinge margin (default: TRD 0.1, MoAlign 0)")
    p.add_argument("--layers", help="0-based block indices, e.g. 17 (the paper's 'layer 18') or 8,17")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (0: full fine-tune)")
    p.add_argument("--backbone", help="cogvideox or wan")
    p.add_argument("--model", help="diffusers pipeline or transformer folder, or hub id")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--resume", help="'latest' or a checkpoint-N folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_preset(p)
    p.set_defaults(fn=cmd_stage2)

    p = sub.add_parser("generate", help="generate videos from a stage-2 run or a pipeline, one per prompt")
    p.add_argument(
        "--model", required=True, help="stage-2 run folder, or a diffusers pipeline folder / hub id"
    )
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder (mp4s, metadata.jsonl, contact_sheet.png)")
    p.add_argument("--base", help="base pipeline of a run whose config names none")
    p.add_argument("--backbone", help="cogvideox or wan (default: from the run or model_index.json)")
    p.add_argument("--num-frames", type=int, default=49, help="frames, 4k+1")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance-scale", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0, help="video i uses seed + i")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    _add_latents_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "judge", help="toy VideoPhy2 judge for playground-style videos (SA, PC, Joint, motion)"
    )
    p.add_argument(
        "--videos", required=True, help="folder with metadata.jsonl (video, caption) and the videos"
    )
    p.add_argument("--out", help="output JSON (default: VIDEOS/judge.json)")
    p.set_defaults(fn=cmd_judge)

    p = sub.add_parser("latents", help="precompute VAE latents and prompt embeddings for stage 2")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument(
        "--model", required=True, help="diffusers pipeline folder or hub id (VAE and text encoder)"
    )
    p.add_argument("--backbone", help="cogvideox or wan (default: the preset's)")
    p.add_argument(
        "--out", required=True, help="cache folder (resumable: re-run the same command after a stop)"
    )
    _add_latents_options(p)
    _add_cache_options(p)
    _add_preset(p)
    _add_data(p)
    p.set_defaults(fn=cmd_latents)

    p = sub.add_parser("targets", help="precompute stage-2 teacher targets (motion tokens) for a dataset")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--teacher", required=True, help="stage-1 run folder (its motion_projector.safetensors)")
    p.add_argument(
        "--out", required=True, help="cache folder (resumable: re-run the same command after a stop)"
    )
    p.add_argument(
        "--raw", action="store_true", help="also store the raw encoder tokens (REPA / TRD ablations)"
    )
    p.add_argument(
        "--skip-bad-videos", action="store_true", help="skip unreadable videos, counted in the cache"
    )
    _add_cache_options(p)
    _add_preset(p)
    p.set_defaults(fn=cmd_targets)

    p = sub.add_parser(
        "precompute",
        help="build the training caches (flow; teacher targets; latents) in one command, split across the "
        "processes of `accelerate launch`",
    )
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument(
        "--out", required=True, help="folder for OUT/flow, OUT/targets, OUT/latents (re-run to resume)"
    )
    p.add_argument("--flow", help="flow cache with this method: dis, farneback, raft, exact (before stage 1)")
    p.add_argument("--raft-weights", help="local RAFT weights file (--flow raft)")
    p.add_argument("--teacher", help="stage-1 run folder: teacher targets cache (after stage 1)")
    p.add_argument(
        "--raw", action="store_true", help="targets also hold raw encoder tokens (REPA / TRD arms)"
    )
    p.add_argument("--model", help="diffusers pipeline folder or hub id: latents + prompt embeddings cache")
    p.add_argument("--backbone", help="cogvideox or wan (default: the preset's)")
    _add_latents_options(p)
    _add_cache_options(p)
    _add_preset(p)
    _add_data(p)
    p.set_defaults(fn=cmd_precompute)
    return parser


def _add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size", type=int, default=64, help="clips per shard file")
    p.add_argument("--overwrite", action="store_true", help="delete the cache(s) first and rebuild")
    p.add_argument(
        "--device", help="device (default: this process's accelerate device, cuda:N on a GPU machine)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_latents_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="float32",
        help="float32, bfloat16 or float16 weights (caches: also the stored tensors)",
    )
    p.add_argument("--vae-tiling", action="store_true", help="VAE in spatial tiles (less memory at 480p+)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except MoalignError as err:
        if args.debug:
            raise
        print(f"moalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

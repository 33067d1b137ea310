"""`moalign stage2`: fine-tune a video DiT with L_diffusion + lambda * L_align, from precomputed caches.

    cached latents + prompt embeddings --DiT (LoRA or full)--> L_diffusion
                      block k tokens --P_zeta--> Z  ~L_align~  cached teacher tokens (motion or raw encoder)

The loop reads a latents cache (items "latents" in the family's layout and "prompt_embeds") and, for an
aligned mode, a teacher-targets cache (`moalign targets`) of the same clips; neither the encoder, the VAE nor
the text encoder is in memory. Outputs: pytorch_lora_weights.safetensors (LoRA, loads with the pipeline's
`load_lora_weights`) or transformer/ (full fine-tune, `from_pretrained`), align_projector.safetensors
(P_zeta, not needed at inference), config.json, log.jsonl, metrics.json, loss_curve.png, checkpoint-N/.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from moalign.alignment import AlignConfig, Aligner, stage2_loss
from moalign.backbones import get_backbone
from moalign.backbones.spec import unwrap
from moalign.data.cache import Cache
from moalign.data.sampling import CLIP_FRAME_FIELDS
from moalign.errors import MoalignError
from moalign.evaluation.validation import MotionWatch
from moalign.latents import LATENTS_KIND
from moalign.run import console
from moalign.run.atomic import write_json
from moalign.run.checkpoint import (
    ACCELERATE_STATE,
    finished_run,
    load_module_file,
    restore_training_state,
    save_module,
    save_training_checkpoint,
    save_transformer,
    training_state,
)
from moalign.run.checks import check_training_fields
from moalign.run.choices import BACKBONES as BACKBONE_NAMES
from moalign.run.launch import (
    autocast_dtype,
    deepspeed_dtype,
    full_state_dict,
    prepare_training,
    reduce_scalars,
    start_launch,
)
from moalign.run.lora import add_lora, lora_target_modules, save_lora
from moalign.run.modelcard import write_model_card
from moalign.run.plots import plot_curves
from moalign.run.serialize import to_dict
from moalign.run.training import (
    StopOnSignal,
    batch_indices,
    check_finite,
    check_report_to,
    cosine_with_warmup,
    format_parameter_counts,
    hold_run_folder,
    open_run,
    optimizer_step,
    parameter_counts,
    resume_checkpoint,
)

logger = console.get_logger(__name__)


RANDOM_MODEL = "tiny-random"  # Stage2Config.model naming the family's tiny transformer with random weights
OPTIMIZERS = ("adamw", "adamw8bit")
STORAGE_DTYPES = ("float8_e4m3fn", "float8_e5m2", "bfloat16", "float16")


@dataclass(frozen=True)
class Stage2Config:
    """Stage 2: which backbone, which alignment, how to train."""

    backbone: str | None = None  # "cogvideox" or "wan"; None: the latents cache's family
    # pipeline folder / transformer folder / hub id; None: the pipeline the latents cache was made with;
    # "tiny-random" (RANDOM_MODEL): the family's tiny transformer with random weights (tests, smoke runs)
    model: str | None = None
    align: AlignConfig = field(default_factory=AlignConfig)
    lora_rank: int = 0  # 0: full fine-tune
    lora_alpha: float | None = None  # None: equal to the rank
    # where the LoRA adapters go: "attention" (q, k, v, out of every attention), "feed-forward", or module names
    lora_targets: tuple[str, ...] = ("attention",)
    steps: int = 200  # optimizer steps
    batch_size: int = 4  # the global batch: split over processes, then into gradient_accumulation_steps
    gradient_accumulation_steps: int = 1  # micro-batches per process and step (same result, less memory)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    # "adamw" (torch) or "adamw8bit" (bitsandbytes' AdamW8bit: optimizer state in 8 bit, a quarter of AdamW's;
    # pip install 'moalign[bnb]')
    optimizer: str = "adamw"
    # LoRA runs: store the frozen base's weights in this dtype ("float8_e4m3fn": half of bf16) and upcast each
    # layer to the compute dtype as it runs (diffusers' layerwise casting); None: the base stays as loaded
    base_storage_dtype: str | None = None
    seed: int = 0
    log_every: int = 10
    report_to: str = "tensorboard"  # also log to RUN/tensorboard/ ("none": RUN/log.jsonl only)
    checkpoint_every: int = 100
    checkpoint_limit: int = 2
    # validation videos: every `validate_every` steps (0: never), through the base pipeline with the
    # transformer being trained, one seeded video per prompt into RUN/validation/step-N/
    validation_prompts: tuple[str, ...] = ()
    validate_every: int = 0
    validation_pipeline: str | None = None  # default: `model`
    validation_frames: int | None = None  # None: the latents cache's clip length
    validation_size: tuple[int, int] | None = None  # (height, width); None: the latents cache's
    validation_steps: int = 25
    validation_judge: bool = False  # playground prompts: also log the toy judge's val_sa, val_pc, val_joint
    license: str | None = None  # the model card's license (None: the base pipeline's card's, else "other")

    # what `--set` says about a name stage 2 does not have (run/serialize.py did_you_mean)
    unknown_field_hints: ClassVar[dict[str, str]] = {
        "data": "stage 2 has no clip sampling: its clips are the latents cache's (set --num-frames, --height, "
        "--width, --fps when making the latents with `moalign latents` or `moalign precompute`)",
    }

    def __post_init__(self) -> None:
        check_training_fields(self)
        if self.backbone is not None and self.backbone not in BACKBONE_NAMES:
            raise ValueError(
                f"backbone must be one of {', '.join(BACKBONE_NAMES)} (or unset), got {self.backbone!r}"
            )
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tune), got {self.lora_rank}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.base_storage_dtype is not None and self.base_storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"base_storage_dtype must be one of {', '.join(STORAGE_DTYPES)} or None, got {self.base_storage_dtype!r}"
            )
        if self.base_storage_dtype is not None and self.lora_rank == 0:
            raise ValueError(
                "base_storage_dtype stores the frozen base of a LoRA run in low precision; a full fine-tune "
                "trains every weight: set lora_rank > 0 or base_storage_dtype=None"
            )
        if not self.lora_targets or not all(isinstance(t, str) and t.strip() for t in self.lora_targets):
            raise ValueError(
                f"lora_targets must name modules or groups (attention, feed-forward), got {self.lora_targets!r}"
            )
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}"
            )
        check_report_to(self.report_to)
        if self.validate_every and not self.validation_prompts:
            raise ValueError("validate_every needs validation_prompts (--set validation_prompts=...)")
        if self.validate_every and self.model == RANDOM_MODEL and not self.validation_pipeline:
            raise ValueError(
                f"validate_every with model {RANDOM_MODEL!r} needs validation_pipeline (a pipeline folder whose "
                "VAE and text encoder decode the validation videos)"
            )


class Stage2Model(torch.nn.Module):
    """The transformer and P_zeta as one module whose forward is the stage-2 loss.

    accelerate prepares it as one model: DeepSpeed needs exactly one (one engine), and DDP / FSDP then sync
    the gradients of both in one pass. Submodules: `transformer`, `aligner`.
    """

    def __init__(
        self,
        spec: Any,
        transformer: torch.nn.Module,
        aligner: Aligner,
        input_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.transformer = transformer
        self.aligner = aligner
        if input_dtype is not None:
            # DeepSpeed holds the whole model in 16 bit: the transformer's floating inputs follow it, while noise,
            # targets and losses stay float32
            transformer.register_forward_pre_hook(_cast_inputs(input_dtype), with_kwargs=True)

    @property
    def _no_split_modules(self) -> list[str]:
        """The transformer's block classes: accelerate's FSDP wraps each in its own unit (TRANSFORMER_BASED_WRAP
        without a class name), so one FSDP config serves every backbone family."""
        return list(getattr(self.transformer, "_no_split_modules", None) or [])

    def forward(self, latents, prompt_embeds, teacher, generator) -> Any:
        return stage2_loss(
            self.spec, self.transformer, self.aligner, latents, prompt_embeds, teacher, generator
        )


def _cast_inputs(dtype: torch.dtype):
    """A forward pre-hook casting a transformer's latent and text inputs (keywords) to `dtype`."""

    def hook(module, args, kwargs):
        cast = {k: kwargs[k].to(dtype) for k in ("hidden_states", "encoder_hidden_states") if k in kwargs}
        return args, {**kwargs, **cast}

    return hook


def _split(state: dict[str, torch.Tensor], names: list[str] | None = None) -> tuple[dict, dict]:
    """A Stage2Model state dict (restricted to `names` when given) -> (transformer weights, aligner weights),
    prefixes off."""
    picked = state if names is None else {n: state[n] for n in names if n in state}
    t = {n.removeprefix("transformer."): v for n, v in picked.items() if n.startswith("transformer.")}
    a = {n.removeprefix("aligner."): v for n, v in picked.items() if n.startswith("aligner.")}
    return t, a


def _absolute_paths(cfg: Stage2Config) -> Stage2Config:
    """`model` and `validation_pipeline` as absolute paths when they are local folders (hub ids stay as given), so
    `moalign generate RUN` finds the base from any working directory."""
    from moalign.generate import model_id

    return replace(
        cfg, **{k: model_id(getattr(cfg, k)) for k in ("model", "validation_pipeline") if getattr(cfg, k)}
    )


def from_latents_cache(cfg: Stage2Config, latents: Cache, transformer_given: bool = False) -> Stage2Config:
    """`cfg` with what it leaves open taken from the latents cache it trains on: the backbone family, the model
    (the pipeline that made the cache) and the validation geometry (the cache's clips).

    Raises:
        MoalignError: the cache's family contradicts `cfg.backbone`, the model's pipeline folder is of another
            family, or no model is configured and the cache was made by a pipeline built in memory (there is no
            transformer to load: a random one is trained only when asked for by name, `RANDOM_MODEL`).
    """
    from moalign.generate import pipeline_family

    fp = latents.fingerprint
    family, cached = fp.get("backbone"), fp.get("model")
    if cfg.backbone is not None and family is not None and family != cfg.backbone:
        raise MoalignError(
            f"{latents.root} holds {family} latents but the configuration asks for backbone {cfg.backbone} (the "
            f"preset's or --backbone): drop --backbone, take a {family} --preset, or make latents with a "
            f"{cfg.backbone} pipeline"
        )
    backbone = cfg.backbone or family
    if backbone is None:
        raise MoalignError(
            f"{latents.root} does not say which backbone made it: pass --backbone cogvideox or wan"
        )
    model = cfg.model
    if model is None and not transformer_given:
        if not cached or str(cached).endswith("(in memory)"):
            raise MoalignError(
                f"{latents.root} was made by a pipeline built in memory ({cached or 'unknown'}), so there is no "
                f"transformer to load: pass --model PIPELINE (folder or hub id), or --model {RANDOM_MODEL} to train "
                f"a randomly initialised tiny {backbone} transformer (tests, smoke runs)"
            )
        model = str(cached)
    found = pipeline_family(model) if model is not None and model != RANDOM_MODEL else None
    if found is not None and found != backbone:
        where = (
            "the latents cache" if cfg.backbone is None else "the configuration (--backbone or the preset's)"
        )
        raise MoalignError(
            f"{model} is a {found} pipeline but {where} says {backbone} ({latents.root} holds {family or backbone} "
            f"latents): pass a {backbone} pipeline as --model, or make the latents with this one"
        )
    data = fp.get("data") if isinstance(fp.get("data"), dict) else {}
    frames = cfg.validation_frames or data.get("num_frames") or 17
    size = cfg.validation_size or (data.get("height", 64), data.get("width", 64))
    try:
        return replace(
            cfg, backbone=backbone, model=model, validation_frames=frames, validation_size=tuple(size)
        )
    except ValueError as err:
        raise MoalignError(f"bad stage-2 configuration: {err}") from err


def _describe(cfg: Stage2Config, latents: Cache, given: Stage2Config, transformer_given: bool) -> str:
    """One line: which model, family and geometry this run trains, and where each came from."""
    if transformer_given:
        model = "a transformer built in memory"
    elif cfg.model == RANDOM_MODEL:
        model = f"a RANDOMLY INITIALISED tiny {cfg.backbone} transformer ({RANDOM_MODEL})"
    else:
        model = f"{cfg.model}" + (" (from the latents cache)" if given.model is None else "")
    data = latents.fingerprint.get("data") or {}
    fps = data.get("fps")
    geometry = (
        f"{data.get('num_frames', '?')} frames at {data.get('height', '?')}x{data.get('width', '?')}"
        + (f", {fps} fps" if fps else ", native fps")
    )
    family = cfg.backbone + (" (from the latents cache)" if given.backbone is None else "")
    return f"[stage2] model {model}; family {family}; clips of {geometry} ({latents.root})"


def _check_same_clips(latents: Cache, targets: Cache) -> None:
    """The two caches hold the same clips: same manifest and count, and the same frames of each video (clip
    length, frame rate and window; the sizes may differ: the teacher encodes at its own resolution)."""
    a, b = latents.fingerprint.get("manifest_sha256"), targets.fingerprint.get("manifest_sha256")
    if a != b or len(latents) != len(targets):
        raise MoalignError(
            f"the latents cache {latents.root} and the targets cache {targets.root} were made from different "
            "clips (manifest or clip count differ); precompute both from the same dataset folder"
        )
    da, db = latents.fingerprint.get("data") or {}, targets.fingerprint.get("data") or {}
    differ = [k for k in CLIP_FRAME_FIELDS if k in da and k in db and da[k] != db[k]]
    if differ:
        listing = ", ".join(f"{k} {da[k]} vs {db[k]}" for k in differ)
        raise MoalignError(
            f"the latents cache {latents.root} and the targets cache {targets.root} cut different frames from each "
            f"video ({listing}): the targets follow the stage-1 teacher's clips, so make the latents with the same "
            f"--num-frames/--fps (or train the teacher on the latents' clip length)"
        )


def _open_caches(cfg: Stage2Config, latents: Cache, targets_cache) -> tuple[Cache, Cache | None, list[int]]:
    """Set-up phase: the latents cache, the teacher-targets cache (aligned modes) and the clips both hold."""
    targets = None
    if cfg.align.mode != "none":
        if targets_cache is None:
            raise MoalignError(f"--align {cfg.align.mode} needs --targets CACHE (made by `moalign targets`)")
        targets = Cache(targets_cache)
        _check_same_clips(latents, targets)
    ids = [i for i in latents.indices if targets is None or i in targets]
    stored = {
        f"{cache.root.name}/{name}": str(value.dtype).removeprefix("torch.")
        for cache in (latents, targets)
        if cache is not None and ids
        for name, value in cache[ids[0]].items()
        if value.is_floating_point() and value.dtype != torch.float32
    }
    if stored:  # caches of any dtype train under any precision: every batch is cast to float32 as it loads
        shown = ", ".join(f"{k} {v}" for k, v in stored.items())
        logger.info(
            f"[stage2] cached {shown}: cast to float32 as each batch loads (mixed_precision "
            f"{cfg.mixed_precision} computes in its own dtype)"
        )
    return latents, targets, ids


def _trainable_transformer(
    spec: Any, cfg: Stage2Config, transformer: torch.nn.Module | None
) -> torch.nn.Module:
    """Set-up phase: the transformer (given, loaded from cfg.model, or the spec's tiny one), with LoRA adapters
    or fully trainable, gradient checkpointing as configured."""
    if transformer is None:
        random = cfg.model == RANDOM_MODEL  # only when asked for by name (`from_latents_cache`)
        transformer = spec.tiny_transformer() if random else spec.load_transformer(cfg.model)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.lora_rank > 0:
        # under mixed precision the frozen base is stored in 16 bit (half the memory), as diffusers' LoRA
        # examples do; the adapters train in float32 and autocast computes in 16 bit
        half = autocast_dtype(cfg.mixed_precision)
        if half is not None:
            transformer.to(half)
        if (
            cfg.base_storage_dtype is not None
        ):  # before the adapters: they stay float32, untouched by the casting
            transformer.enable_layerwise_casting(
                storage_dtype=getattr(torch, cfg.base_storage_dtype), compute_dtype=half or torch.float32
            )
        add_lora(
            transformer, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, lora_target_modules(cfg.lora_targets)
        )
        alpha = cfg.lora_alpha or cfg.lora_rank
        logger.info(
            f"[stage2] LoRA rank {cfg.lora_rank}, alpha {alpha:g} (scale {alpha / cfg.lora_rank:g}) on "
            f"{', '.join(cfg.lora_targets)}"
        )
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        transformer.requires_grad_(True)
    return transformer


def _build_aligner(
    spec, cfg: Stage2Config, transformer, latents: Cache, targets, ids
) -> tuple[Aligner, tuple]:
    """Set-up phase: P_zeta for the transformer's token grid and the teacher's, with the layer indices checked."""
    first = latents[ids[0]]
    grid = spec.token_grid(transformer, first["latents"][None])
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    key = cfg.align.teacher_key
    if targets is not None and key not in targets[ids[0]]:
        raise MoalignError(
            f"--align {cfg.align.mode} aligns to {key!r} tokens but {targets.root} has only "
            f"{sorted(targets[ids[0]])}; re-run `moalign targets` with --raw for the raw-feature arms"
        )
    n_blocks = len(spec.blocks(transformer))
    bad = [i for i in cfg.align.layers if not -n_blocks <= i < n_blocks]
    if bad and cfg.align.mode != "none":
        raise MoalignError(
            f"align layers {bad} are out of range: the model has {n_blocks} blocks, 0-based 0..{n_blocks - 1} "
            "(the paper's 'layer 18' of CogVideoX-2B is 17); fix --layers"
        )
    teacher0 = targets[ids[0]][key] if targets is not None else torch.zeros(1, 1, 1, 1)
    try:
        aligner = Aligner(cfg.align, hidden, teacher0.shape[-1], grid, tuple(teacher0.shape[:3]))
    except ValueError as err:  # e.g. a latent grid that is no integer multiple of the teacher's
        raise MoalignError(
            f"cannot align {grid} latent tokens to the {tuple(teacher0.shape[:3])} teacher grid: {err}"
        ) from err
    counts = parameter_counts(transformer=transformer, align_projector=aligner)
    where = (
        ""
        if cfg.align.mode == "none"
        else f" at block(s) {list(cfg.align.layers)} (0-based), lambda {cfg.align.lam}"
    )
    logger.info(
        f"[stage2] {cfg.backbone}: {n_blocks} blocks, token grid {grid}, align {cfg.align.mode}{where}; "
        f"{len(ids)} clips\n[stage2] {format_parameter_counts(counts)}"
    )
    return aligner, grid


def _optimizer(model: torch.nn.Module, cfg: Stage2Config) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (torch's, or bitsandbytes' 8-bit one) over the trainable parameters and the warm-up + cosine LR
    schedule."""
    cls = torch.optim.AdamW
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as err:
            raise MoalignError(
                "optimizer adamw8bit needs bitsandbytes: pip install 'moalign[bnb]' (or pip install bitsandbytes), "
                "or use --set optimizer=adamw"
            ) from err
        cls = bitsandbytes.optim.AdamW8bit
    optimizer = cls(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    return optimizer, cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)


def _resume_weights(ckpt: Path | None, model: Stage2Model, optimizer, scheduler) -> int:
    """Load a (non-sharded) checkpoint's trainable weights, optimizer and schedule; the step to continue from."""
    if ckpt is None or (ckpt / ACCELERATE_STATE).is_dir():
        return 0
    state, _ = load_module_file(ckpt / "transformer_trainable.safetensors", "transformer_trainable")
    missing = set(state) - {n for n, _ in model.transformer.named_parameters()}
    if missing:
        raise MoalignError(f"{ckpt} does not match this model (unknown weights {sorted(missing)[:3]} ...)")
    model.transformer.load_state_dict(state, strict=False)
    model.aligner.load_state_dict(
        load_module_file(ckpt / "align_projector.safetensors", "align_projector")[0]
    )
    return restore_training_state(ckpt, optimizer, scheduler)


def _resume_sharded(
    accelerator, ckpt: Path | None, sharded: bool, scheduler, start_step: int, validate_every: int = 0
) -> int:
    """Load a DeepSpeed / FSDP checkpoint through accelerate (every process joins); the step to continue from.
    Validation needs the whole transformer in one process: refused under sharding."""
    if sharded and validate_every:
        raise MoalignError(
            "validation videos need the whole transformer in one process; with DeepSpeed / FSDP generate from "
            "the checkpoints instead (--set validate_every=0)"
        )
    if ckpt is not None and (ckpt / ACCELERATE_STATE).is_dir():
        if not sharded:
            raise MoalignError(
                f"{ckpt} was written by a DeepSpeed / FSDP run; resume it with the same accelerate config"
            )
        accelerator.load_state(str(ckpt / ACCELERATE_STATE))
        start_step = restore_training_state(ckpt, None, scheduler)
    if ckpt is not None:
        logger.info(f"[stage2] resumed from {ckpt} at step {start_step}")
    return start_step


@dataclass
class _Batches:
    """Reads one process's share of a global batch from the caches, in micro-batches."""

    latents: Cache
    targets: Cache | None
    ids: list[int]
    key: str
    cfg: Stage2Config
    micro: int
    device: Any

    def micro_batches(self, step: int, rank: int, world: int):
        """Yields (latents, prompt_embeds, teacher or None, noise generators) per micro-batch; a sample's
        position j in the global batch keys its noise, so the step's gradient is the same however the batch is
        split."""
        batch = batch_indices(len(self.ids), self.cfg.batch_size, step, self.cfg.seed)
        share = list(range(rank, len(batch), world))
        for a in range(self.cfg.gradient_accumulation_steps):
            positions = share[a * self.micro : (a + 1) * self.micro]
            idx = [self.ids[j] for j in batch[positions].tolist()]
            items = [self.latents[i] for i in idx]
            # float32 whatever the caches store (a bfloat16 or float16 cache trains under any precision)
            lat = torch.stack([it["latents"] for it in items]).to(self.device, torch.float32)
            emb = torch.stack([it["prompt_embeds"] for it in items]).to(self.device, torch.float32)
            teacher = None
            if self.targets is not None:
                teacher = torch.stack([self.targets[i][self.key] for i in idx]).to(self.device, torch.float32)
            seed = self.cfg.seed * 1_000_003 + step * 10_007
            yield lat, emb, teacher, [torch.Generator().manual_seed(seed + j) for j in positions]


def train_stage2(
    latents_cache: str | Path,
    out_dir: str | Path,
    cfg: Stage2Config,
    targets_cache: str | Path | None = None,
    resume: str | None = None,
    progress: bool = True,
    command: str = "",
    transformer: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Fine-tune the backbone with the configured alignment; see the module docstring for the outputs.

    Args:
        latents_cache: cache with "latents" and "prompt_embeds" per clip.
        out_dir: the run folder.
        cfg: resolved config.
        targets_cache: `moalign targets` cache of the same clips (required unless align.mode is "none").
        resume: "latest" (the newest checkpoint-N; a fresh start when there is none; returns at once when the run
            is finished) or a checkpoint-N folder.
        transformer: an already built transformer (the demo's base model); else loaded from cfg.model.

    Returns:
        metrics: final loss parts (means over the last 10 logged steps), steps, seconds.
    """
    from accelerate.utils import DistributedType, set_seed

    out_dir = Path(out_dir)
    _lock = hold_run_folder(out_dir, create=False)  # held while this run works: a folder in use stops at once
    given = cfg
    latents = Cache(latents_cache, kind=LATENTS_KIND)
    cfg = from_latents_cache(cfg, latents, transformer is not None)
    cfg = _absolute_paths(cfg)  # the run records where its base is, whatever the working directory
    done_metrics = finished_run(out_dir, resume, "stage-2", cfg.steps, to_dict(cfg))
    if done_metrics is not None:
        return done_metrics
    spec = get_backbone(cfg.backbone)
    _check_geometry(spec, cfg, latents)  # before any model loads
    if cfg.model and cfg.model != RANDOM_MODEL:
        spec.use_pipeline_scheduler(cfg.model)  # train on the noise schedule the pipeline samples with
    # micro: clips per process and micro-batch
    accelerator, micro, launch = start_launch(
        "stage2", cfg.mixed_precision, cfg.batch_size, cfg.gradient_accumulation_steps, shardable=True
    )
    set_seed(cfg.seed)
    latents, targets, ids = _open_caches(cfg, latents, targets_cache)
    logger.info(_describe(cfg, latents, given, transformer is not None))
    transformer = _trainable_transformer(spec, cfg, transformer)
    _check_geometry(spec, cfg, latents, transformer)
    aligner, grid = _build_aligner(spec, cfg, transformer, latents, targets, ids)
    model = Stage2Model(spec, transformer, aligner, input_dtype=deepspeed_dtype(accelerator))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]  # names survive every wrapper
    optimizer, scheduler = _optimizer(model, cfg)
    # what the run trains on, by content: a resume onto other caches at the same paths is refused
    inputs = {"latents": latents.digest, "targets": targets.digest if targets is not None else None}
    ckpt = resume_checkpoint(out_dir, resume, to_dict(cfg), inputs)
    start_step = _resume_weights(ckpt, model, optimizer, scheduler)
    model, optimizer, params = prepare_training(
        accelerator, model, optimizer, micro_batch=micro, grad_clip=cfg.grad_clip
    )
    # DeepSpeed ZeRO and FSDP shard the optimizer state (ZeRO-3 and FSDP the weights too): their checkpoints go
    # through accelerate's save_state / load_state, which every process joins
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    start_step = _resume_sharded(accelerator, ckpt, sharded, scheduler, start_step, cfg.validate_every)
    device = accelerator.device
    log = open_run(accelerator, out_dir, to_dict(cfg), command, launch, start_step, cfg.report_to, inputs)
    data = _Batches(latents, targets, ids, cfg.align.teacher_key, cfg, micro, device)
    save = _Checkpointer(
        accelerator, out_dir, cfg, spec, {"stage2": to_dict(cfg), "token_grid": list(grid)}, trainable
    )

    model.train()
    watch = MotionWatch(spec, cfg, out_dir, device, accelerator.is_main_process, model, start_step, log=log)
    t0 = time.time()
    seen = 0  # clips this process trained on in this launch: its share of every global batch
    bar = console.progress(range(start_step, cfg.steps), enabled=progress, desc=f"stage2 ({cfg.align.mode})")
    with StopOnSignal("stage2") as stop:
        for step in bar:
            sums, clips = _backward(accelerator, model, data, step)
            seen += clips
            # the last micro-batch synchronised the gradients: one optimizer step per global batch
            optimizer_step(accelerator, optimizer, scheduler, params, cfg.grad_clip, step=step)
            done = step + 1
            if step % cfg.log_every == 0 or done == cfg.steps:
                scalars = reduce_scalars(accelerator, sums)  # the global batch's mean, not rank 0's share
                log.log(step, **scalars, lr=scheduler.get_last_lr()[0])
                bar.set_postfix(diff=f"{scalars['diffusion']:.3f}", align=f"{scalars.get('align', 0.0):.3f}")
            watch(model, done, step, log)  # validation videos and their motion, when due
            due = stop.due(accelerator)  # every process asks at every step
            # the last step too (a run can be extended), and the step a stop signal came in
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or due:
                save.checkpoint(model, done, optimizer, scheduler, sharded)
            if due:
                log.close()
                stop.stop(done, cfg.steps, out_dir / f"checkpoint-{done}")

    seen_all = accelerator.gather(torch.tensor([seen], device=device)).tolist()  # every process joins
    return save.finish(model, log, latents, launch, sharded, seen_all, len(ids), time.time() - t0)


def _check_geometry(
    spec, cfg: Stage2Config, latents: Cache, transformer: torch.nn.Module | None = None
) -> None:
    """Before any model loads (`transformer` None): the validation videos' geometry, when validating. With the
    loaded transformer: the cache's clips against its training geometry (e.g. CogVideoX 1.5 trains on 8k+5
    frames). Raises MoalignError naming the nearest valid values (`BackboneSpec.check_geometry`)."""
    if transformer is None:
        if cfg.validate_every and cfg.validation_prompts:
            spec.check_geometry(
                cfg.validation_frames, *cfg.validation_size, flags=("--set validation_frames=", "height", "width"),
                what="stage 2's validation videos (--set validation_size=HEIGHT,WIDTH)",
            )  # fmt: skip
        return
    data = latents.fingerprint.get("data") or {}
    if all(k in data for k in ("num_frames", "height", "width")):
        spec.check_geometry(
            data["num_frames"], data["height"], data["width"], what=f"stage 2 on the latents in {latents.root}",
            transformer_config=unwrap(transformer).config, training=True,
        )  # fmt: skip


def _backward(accelerator, model, data: _Batches, step: int) -> tuple[dict[str, float], int]:
    """Forward and backward of this process's share of step `step`'s global batch, micro-batch by micro-batch;
    (loss parts averaged over the micro-batches, clips seen). Stops at a non-finite loss."""
    sums: dict[str, float] = {}
    seen = 0
    accum = data.cfg.gradient_accumulation_steps
    for lat, emb, teacher, gen in data.micro_batches(
        step, accelerator.process_index, accelerator.num_processes
    ):
        seen += len(lat)
        # no gradient all-reduce until the last micro-batch; accelerate scales the loss by 1/accum
        with accelerator.accumulate(model):
            with accelerator.autocast():
                parts = model(lat, emb, teacher, gen)
            check_finite(step, parts)
            accelerator.backward(parts.total)
        for k, v in parts.scalars().items():
            sums[k] = sums.get(k, 0.0) + v / accum
    return sums, seen


@dataclass
class _Checkpointer:
    """Writes stage 2's checkpoints and its final outputs (every process joins; the main one writes).

    Each checkpoint-N/ holds what exact resume needs (transformer_trainable.safetensors, align_projector.safetensors,
    training_state.pt) and the weights in the form people load: pytorch_lora_weights.safetensors for a LoRA run
    (`pipe.load_lora_weights("RUN/checkpoint-N")`), transformer/ for a full fine-tune (`from_pretrained`).
    """

    accelerator: Any
    out_dir: Path
    cfg: Stage2Config
    spec: Any
    meta: dict[str, Any]
    trainable: list[str]

    def save_loadable(self, model, folder: Path, full: dict, sharded: bool) -> None:
        """The LoRA file or transformer/ folder into `folder` (main process); `full`: the gathered state dict."""
        base = unwrap(model).transformer
        gathered = (
            _split(full)[0] if sharded else None
        )  # else the module's own weights are whole: save from it
        if self.cfg.lora_rank > 0:
            save_lora(self.spec.pipeline_class, base, folder, state=gathered)
        else:
            save_transformer(base, folder / "transformer", state=gathered)

    def checkpoint(self, model, done: int, optimizer, scheduler, sharded: bool) -> None:
        acc, out_dir = self.accelerator, self.out_dir
        full = full_state_dict(acc, model)  # every process joins; None except on the main one
        partial = out_dir / f".checkpoint-{done}.partial"
        if sharded:
            if acc.is_main_process:  # a killed run's (perhaps of another process count): no stray rank files
                shutil.rmtree(partial, ignore_errors=True)
            acc.wait_for_everyone()
            acc.save_state(str(partial / ACCELERATE_STATE))  # every process writes its shard
            acc.wait_for_everyone()  # all shards are on disk before the folder is renamed
        if acc.is_main_process:
            t_state, a_state = _split(full, self.trainable)
            save_training_checkpoint(
                out_dir,
                done,
                {
                    "transformer_trainable": (t_state, "transformer_trainable", self.meta),
                    "align_projector": (a_state, "align_projector", self.meta),
                },
                training_state(None if sharded else optimizer, scheduler),
                limit=self.cfg.checkpoint_limit,
                config=to_dict(self.cfg),
                partial=partial if sharded else None,
                extra=lambda folder: self.save_loadable(model, folder, full, sharded),
            )
        acc.wait_for_everyone()

    def finish(self, model, log, latents: Cache, launch, sharded, seen_all, clips, seconds) -> dict:
        """Final phase: the LoRA file or transformer/, P_zeta, model card, metrics.json, loss curves."""
        acc, out_dir, cfg = self.accelerator, self.out_dir, self.cfg
        rows = [r for r in log.history if "total" in r][-10:]
        metrics = {
            k: sum(r[k] for r in rows) / len(rows) for k in rows[-1] if k not in ("step", "time_s", "lr")
        } if rows else {}  # fmt: skip
        log.close()
        metrics.update(
            steps=cfg.steps, train_seconds=round(seconds, 1), clips=clips, align_mode=cfg.align.mode,
            num_processes=acc.num_processes, engine=launch["engine"], clips_per_process=seen_all,
        )  # fmt: skip
        full_state = full_state_dict(acc, model)  # every process joins (ZeRO-3 / FSDP gather here)
        if acc.is_main_process:
            a_state = _split(full_state)[1]
            self.save_loadable(model, out_dir, full_state, sharded)
            save_module(out_dir / "align_projector.safetensors", a_state, "align_projector", self.meta)
            data = {k: latents.fingerprint.get(k) for k in ("num_clips", "manifest_sha256", "data")}
            write_model_card(out_dir, to_dict(cfg), metrics, data, self.spec)
            write_json(out_dir / "metrics.json", metrics)
            series = {k: log.series(k) for k in ("diffusion", "align", "total")}
            plot_curves(
                out_dir / "loss_curve.png", series, title=f"stage 2 ({cfg.backbone}, align {cfg.align.mode})"
            )
        acc.wait_for_everyone()
        logger.info(f"[stage2] done in {metrics['train_seconds']} s; wrote {out_dir}")
        return metrics

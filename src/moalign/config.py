"""Typed, frozen run configurations and the named presets (recipes) that fill them.

A recipe holds one config per stage. Presets derive from each other by replacing fields; the CLI picks a
preset and applies a few overrides (`--set stage1.lr=3e-4`). The resolved config is written into every run
folder and checkpoint. Module-level configs (data, encoder, heads) live beside their modules.
"""

from __future__ import annotations

import ast
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from moalign.align_projector import AlignProjectorConfig
from moalign.alignment import AlignConfig
from moalign.basemodel import BaseModelConfig
from moalign.data import DataConfig
from moalign.encoder import EncoderConfig
from moalign.flow_decoder import FlowDecoderConfig
from moalign.motion_projector import MotionProjectorConfig
from moalign.playground import SynthConfig
from moalign.training import check_report_to


@dataclass(frozen=True)
class MAEModelConfig:
    """Architecture of a VideoMAE trained from scratch by `moalign pretrain-encoder` (transformers VideoMAEConfig)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    patch_size: int = 8
    tubelet_size: int = 2
    decoder_hidden_size: int = 96
    decoder_num_hidden_layers: int = 2
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 384
    layer_norm_eps: float = 1e-6  # VideoMAEv2's value, so trained and converted encoders behave alike
    # VideoMAE normalises each target patch by its own mean/std. On the playground most patches are flat
    # colour, whose normalised targets are amplified compression noise, so the default predicts plain pixels.
    norm_pix_loss: bool = False


@dataclass(frozen=True)
class PretrainEncoderConfig:
    """Masked-autoencoder pretraining of a small VideoMAE on a dataset (the playground has no pretrained encoder)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    input_size: tuple[int, int] = (64, 64)  # encoder input (H, W); frames are resized to it
    mask_ratio: float = 0.75  # tube masking (VideoMAE): the same spatial patches are hidden in every tubelet
    steps: int = 600
    batch_size: int = 8
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    hflip: bool = True  # random horizontal flips (appearance pretraining; flow is not involved here)
    seed: int = 0
    log_every: int = 25
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16", applied by accelerate

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1: learn the motion subspace M_psi (and the flow decoder F_omega) on the frozen encoder."""

    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(input_size=(64, 64)))
    projector: MotionProjectorConfig = field(default_factory=lambda: MotionProjectorConfig(hidden_dim=256))
    decoder: FlowDecoderConfig = field(default_factory=lambda: FlowDecoderConfig(hidden_dim=96))
    flow_method: str = "auto"  # "auto": exact ground truth when the manifest has it, else "dis"
    flow_loss: str = (
        "l1"  # the paper's L1; "huber" escapes the all-zero plateau on sparse (playground) motion
    )
    huber_delta: float = 1.0  # px at the decoder resolution, for flow_loss="huber"
    stats_clips: int = 64  # training clips whose features fix M_psi's input standardisation
    val_clips: int = 8  # held out for val_epe, chosen by a seeded permutation of the manifest
    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 40
    grad_clip: float = 1.0
    feature_cache: str = "memory"  # "memory": encode each clip once (the encoder is frozen and deterministic)
    seed: int = 0
    log_every: int = 25
    val_every: int = 200
    checkpoint_every: int = 400
    mixed_precision: str = "no"
    report_to: str = "tensorboard"  # also log to RUN/tensorboard/ ("none": RUN/log.jsonl only)

    def __post_init__(self) -> None:
        check_report_to(self.report_to)
        if self.feature_cache not in ("memory", "none"):
            raise ValueError(f"feature_cache must be 'memory' or 'none', got {self.feature_cache!r}")
        if self.flow_loss not in ("l1", "huber", "l2"):
            raise ValueError(f"flow_loss must be 'l1', 'huber' or 'l2', got {self.flow_loss!r}")
        if self.val_clips < 1:
            raise ValueError("val_clips must be >= 1: val_epe is measured on held-out clips")


@dataclass(frozen=True)
class Stage2Config:
    """Stage 2: which backbone, which alignment, how to train."""

    backbone: str = "cogvideox"
    # pipeline folder / transformer folder / hub id; None: the spec's tiny transformer
    model: str | None = None
    align: AlignConfig = field(default_factory=AlignConfig)
    lora_rank: int = 0  # 0: full fine-tune
    lora_alpha: float | None = None  # None: equal to the rank
    steps: int = 200  # optimizer steps
    batch_size: int = 4  # the global batch: split over processes, then into gradient_accumulation_steps
    gradient_accumulation_steps: int = 1  # micro-batches per process and step (same result, less memory)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
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
    validation_frames: int = 17
    validation_size: tuple[int, int] = (64, 64)
    validation_steps: int = 25

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tune), got {self.lora_rank}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}"
            )
        check_report_to(self.report_to)
        if self.validate_every and not (self.validation_prompts and (self.validation_pipeline or self.model)):
            raise ValueError(
                "validate_every needs validation_prompts and a pipeline folder (validation_pipeline or model)"
            )


DEMO_ARMS = (
    "none",
    "trd",
    "moalign",
)  # SPEC Sec. 3 names: no alignment, VideoREPA TRD on raw features, MoAlign


@dataclass(frozen=True)
class DemoConfig:
    """What `moalign demo` does after stage 1: a base model from scratch, fine-tuning arms, judging.

    Every arm starts from the same base transformer and trains with `arm_training` (same seed, so the same
    clips in the same order and the same noise draws); only `align.mode` differs, and with it the teacher
    (raw encoder tokens for trd, the motion subspace for moalign).
    """

    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    base_training: Stage2Config = field(
        default_factory=lambda: Stage2Config(align=AlignConfig(mode="none"), steps=800, batch_size=8, lr=1e-3)
    )
    arms: tuple[str, ...] = DEMO_ARMS
    arm_training: Stage2Config = field(
        default_factory=lambda: Stage2Config(
            align=AlignConfig(mode="moalign", layers=(1,)), steps=200, batch_size=8
        )
    )
    eval_clips: int = 24  # held-out playground scenes (another seed); their captions are the prompts
    eval_seed: int = 1_000_003
    generation_steps: int = 25
    guidance_scale: float = 1.0  # the base model never saw empty prompts: no classifier-free guidance
    gif_prompts: int = 4  # rows of the side-by-side GIF

    def __post_init__(self) -> None:
        if isinstance(self.arms, str):
            object.__setattr__(self, "arms", tuple(a.strip() for a in self.arms.split(",") if a.strip()))
        if isinstance(self.arms, list):
            object.__setattr__(self, "arms", tuple(self.arms))


@dataclass(frozen=True)
class Recipe:
    """One config per stage; `moalign <stage> --preset NAME` uses the matching part."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    pretrain: PretrainEncoderConfig = field(default_factory=PretrainEncoderConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    demo: DemoConfig = field(default_factory=DemoConfig)


def tiny() -> Recipe:
    """The playground on 2 CPU cores in minutes: 17 frames at 64x64, a 4-block 128-d VideoMAE (patch 8).

    Departures from the paper's stage-1 settings, each measured on this preset (docs/stage1.md): flow at
    1/2 of the encoder input (at 64x64, 1/4 cannot draw the balls: even the exact flow, downsampled and
    upsampled again, keeps a third of the zero-motion error), a Huber flow loss (L1 stays on the all-zero
    plateau), and balls of radius 7 to 12 px so that motion covers a learnable share of the pixels.
    """
    data = DataConfig(num_frames=17, height=64, width=64)
    return Recipe(
        synth=SynthConfig(
            num_clips=192, num_frames=17, height=64, width=64, radius=(7.0, 12.0), background="plain"
        ),
        pretrain=PretrainEncoderConfig(data=data, lr=3e-4, mask_ratio=0.9),
        stage1=Stage1Config(
            data=data,
            decoder=FlowDecoderConfig(hidden_dim=96, stride=2),
            flow_loss="huber",
            val_clips=16,
            steps=1500,
            val_every=500,
            checkpoint_every=500,
        ),
        stage2=Stage2Config(
            backbone="cogvideox",
            align=AlignConfig(mode="moalign", layers=(1,), projector=AlignProjectorConfig(hidden_dim=256)),
            lora_rank=0,
            steps=200,
            batch_size=4,
            lr=1e-4,
        ),
        demo=DemoConfig(
            arm_training=Stage2Config(
                align=AlignConfig(
                    mode="moalign",
                    layers=(1,),
                    projector=AlignProjectorConfig(hidden_dim=256, grid_match="resample_teacher"),
                ),
                steps=200,
                batch_size=8,
                lr=3e-4,
                warmup_steps=20,
                checkpoint_every=100,
            ),
        ),  # fmt: skip
    )


def small() -> Recipe:
    """The same playground code, bigger: for a GPU (128x128, patch 16, 8-block 384-d encoder, more clips/steps)."""
    base = tiny()
    data = DataConfig(num_frames=17, height=128, width=128)
    model = MAEModelConfig(
        hidden_size=384,
        num_hidden_layers=8,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=16,
        decoder_hidden_size=192,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=6,
        decoder_intermediate_size=768,
    )
    return Recipe(
        synth=replace(base.synth, num_clips=2048, height=128, width=128, radius=(14.0, 24.0)),
        pretrain=replace(
            base.pretrain, data=data, model=model, input_size=(128, 128), mask_ratio=0.9, steps=6000,
            batch_size=32, lr=1.5e-3, warmup_steps=400, mixed_precision="bf16",
        ),
        stage1=replace(
            base.stage1, data=data, encoder=replace(base.stage1.encoder, input_size=(128, 128)),
            projector=MotionProjectorConfig(hidden_dim=512), decoder=FlowDecoderConfig(hidden_dim=128),
            val_clips=64, steps=4000, batch_size=32, lr=1e-3, warmup_steps=200, val_every=500,
            checkpoint_every=1000, mixed_precision="bf16",
        ),
        demo=DemoConfig(
            base=BaseModelConfig(
                height=128, width=128, vae_channels=(32, 64, 64), vae_steps=3000, vae_batch_size=8, vae_window=17,
                vae_val_clips=32, num_layers=8, num_attention_heads=6, attention_head_dim=64, mixed_precision="bf16",
            ),
            base_training=replace(
                base.demo.base_training, steps=10000, batch_size=32, lr=5e-4, warmup_steps=200,
                checkpoint_every=1000, mixed_precision="bf16",
            ),
            arm_training=replace(
                base.demo.arm_training, steps=1000, batch_size=32, lr=1e-4, warmup_steps=50, checkpoint_every=250,
                mixed_precision="bf16",
                align=replace(base.demo.arm_training.align, layers=(4,),
                              projector=AlignProjectorConfig(hidden_dim=512, grid_match="resample_teacher")),
            ),
            eval_clips=64,
        ),
    )  # fmt: skip


def cogvideox_2b() -> Recipe:
    """The paper's recipe: CogVideoX-2B full fine-tune, 49 frames at 480x720, VideoMAEv2 ViT-B at 160x240.

    Stage-1 optimisation settings are ours (the paper gives none); the encoder folder comes from
    `moalign convert-videomaev2 vit_b_k710_dl_from_giant.pth ...` and is passed with --encoder.
    """
    data = DataConfig(num_frames=49, height=480, width=720, fps=8.0)
    return Recipe(
        synth=tiny().synth,
        pretrain=PretrainEncoderConfig(data=data),
        stage1=Stage1Config(
            data=data,
            encoder=EncoderConfig(input_size=(160, 240)),
            projector=MotionProjectorConfig(in_dim=768, hidden_dim=512),
            decoder=FlowDecoderConfig(hidden_dim=128),
            flow_method="dis",
            feature_cache="none",
            val_clips=64,
            steps=10000,
            batch_size=32,
            lr=1e-4,
            warmup_steps=500,
            val_every=1000,
            checkpoint_every=1000,
            mixed_precision="bf16",
        ),
        # the paper's CogVideoX-2B recipe (SPEC Sec. 3): full fine-tune, block 17 ("layer 18"), lambda 0.5,
        # tau 10, lr 2e-6, bf16, 4,000 steps at a global batch of 32 (stage 2's batch_size is the global batch,
        # split evenly across processes: 4 per GPU on 8 GPUs)
        stage2=Stage2Config(
            backbone="cogvideox",
            model="THUDM/CogVideoX-2b",
            align=AlignConfig(mode="moalign", layers=(17,), lam=0.5, tau=10.0),
            lora_rank=0,
            steps=4000,
            batch_size=32,
            lr=2e-6,
            warmup_steps=100,
            gradient_checkpointing=True,
            mixed_precision="bf16",
            checkpoint_every=500,
        ),
    )


def cogvideox_5b() -> Recipe:
    """CogVideoX-5B with LoRA (rank 128, alpha 64, lr 1e-4), same data geometry and teacher as cogvideox-2b.

    The paper gives no layer for 5B: block 23 of 42 (0-based) sits at the relative depth of 2B's block 17 of 30.
    """
    base = cogvideox_2b()
    return replace(
        base,
        stage2=replace(
            base.stage2, model="THUDM/CogVideoX-5b", align=replace(base.stage2.align, layers=(23,)), lora_rank=128,
            lora_alpha=64.0, lr=1e-4,
        ),
    )  # fmt: skip


def _wan(model: str, layer: int) -> Recipe:
    """Wan2.1 T2V: 81 frames at 480x832, 16 fps; teacher VideoMAEv2 ViT-B at 160x272 (40 x 10 x 17 tokens).

    The teacher is resampled to the latent grid (21 x 30 x 52) instead of VideoREPA's strided conv, whose
    stride does not divide Wan's 52 latent columns; the block-wise relational loss keeps memory bounded.
    LoRA by default (rank 64, alpha 64, lr 1e-4, as the community Wan trainers); the layer sits at the relative
    depth of the paper's CogVideoX-2B choice (block 17 of 30).
    """
    base = cogvideox_2b()
    data = DataConfig(num_frames=81, height=480, width=832, fps=16.0)
    return replace(
        base,
        pretrain=PretrainEncoderConfig(data=data),
        stage1=replace(base.stage1, data=data, encoder=replace(base.stage1.encoder, input_size=(160, 272))),
        stage2=replace(
            base.stage2, backbone="wan", model=model, lora_rank=64, lora_alpha=64.0, lr=1e-4,
            align=replace(
                base.stage2.align, layers=(layer,),
                projector=replace(base.stage2.align.projector, grid_match="resample_teacher"),
            ),
        ),
    )  # fmt: skip


def wan21_1_3b() -> Recipe:
    """Wan2.1-T2V-1.3B, LoRA, block 17 of 30 (0-based); see _wan for the shared choices."""
    return _wan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 17)


def wan21_14b() -> Recipe:
    """Wan2.1-T2V-14B, LoRA, block 23 of 40 (0-based); see _wan for the shared choices."""
    return _wan("Wan-AI/Wan2.1-T2V-14B-Diffusers", 23)


PRESETS: dict[str, typing.Callable[[], Recipe]] = {
    "tiny": tiny,
    "small": small,
    "cogvideox-2b": cogvideox_2b,
    "cogvideox-5b": cogvideox_5b,
    "wan2.1-1.3b": wan21_1_3b,
    "wan2.1-14b": wan21_14b,
}


def get_preset(name: str) -> Recipe:
    """The recipe of a named preset; an unknown name raises an error listing the valid ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


# ---- serialisation and overrides ---------------------------------------------------------------------------


def to_dict(cfg: Any) -> Any:
    """A JSON-able dict of a (nested) config dataclass; tuples become lists."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from `to_dict` output (unknown keys are an error: a config from elsewhere)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {name: _coerce(hints[name], value) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    """Convert a JSON/literal value to the annotated field type (nested dataclasses, tuples, optionals)."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        last_err: Exception | None = None
        for arg in args:
            try:
                return _coerce(arg, value)
            except (TypeError, ValueError) as err:
                last_err = err
        raise ValueError(f"cannot read {value!r} as {tp}") from last_err
    if is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value)
        raise ValueError(f"expected a mapping for {tp.__name__}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        elif not isinstance(value, list | tuple):
            value = [value]  # `--layers 17` is the one-element tuple (17,)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} values for {tp}, got {value!r}")
        return tuple(_coerce(a, v) for a, v in zip(args, value, strict=True))
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return tp(value)
    if tp is typing.Any:
        return value
    return value


def _parse_literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `dotted.path=value` overrides to a frozen config, e.g. `encoder.layer=5`, `data.fps=8`.

    Values are Python literals (numbers, True/False, None, tuples like 64,64) or plain strings. All overrides
    are applied before the configs check themselves, so their order does not matter (validate_every and
    validation_prompts may come in either order).
    """
    if not overrides:
        return cfg
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. --set lr=3e-4)")
        path, raw = item.split("=", 1)
        _set_path(type(cfg), data, path.strip().split("."), _parse_literal(raw.strip()), path)
    return from_dict(type(cfg), data)


def _set_path(cls: type, data: dict, keys: list[str], value: Any, full: str) -> None:
    """Set `value` (coerced to the field's type) at the dotted `keys` of a config dict of class `cls`."""
    names = {f.name for f in fields(cls)}
    key = keys[0]
    if key not in names:
        raise ValueError(f"unknown config field {full!r}: {cls.__name__} has {', '.join(sorted(names))}")
    tp = typing.get_type_hints(cls)[key]
    if len(keys) == 1:
        data[key] = to_dict(_coerce(tp, value))
        return
    if not is_dataclass(tp) or not isinstance(data.get(key), dict):
        raise ValueError(f"config field {'.'.join(full.split('.')[: -len(keys) + 1])!r} has no sub-fields")
    _set_path(tp, data[key], keys[1:], value, full)


__all__ = [
    "BaseModelConfig",
    "DemoConfig",
    "MAEModelConfig",
    "PRESETS",
    "PretrainEncoderConfig",
    "Recipe",
    "Stage1Config",
    "Stage2Config",
    "apply_overrides",
    "from_dict",
    "get_preset",
    "to_dict",
]

"""What every backbone family must tell the trainer: one small spec object per family.

A spec knows where the blocks are, what a block returns, the latent layout and token grid, how to call the
transformer, and the training objective. The trainer speaks only to this interface, so adding a backbone
is a new file plus one line in `moalign.backbones.BACKBONES`, never an `if` in the trainer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moalign.errors import MoalignError, loading
from moalign.losses import LossParts

GENERATE_FLAGS = ("--num-frames", "--height", "--width")  # how the geometry checks name the three values


@dataclass(frozen=True)
class GeometryRule:
    """The clip geometry a family's VAE and transformer accept.

    Frames: the VAE keeps frame 0 and compresses every `frame_step` later frames into one latent frame, so a
    clip has 1 + frame_step * k frames; training on a transformer with a temporal patch (CogVideoX 1.5:
    patch_size_t 2) also needs the latent frames (k + 1) to divide by `latent_frame_multiple`. Sizes: height
    and width divide by VAE downsampling x spatial patch (`size_multiple`, in pixels; 8 x 2 = 16 for
    CogVideoX and Wan2.1). `why` says where the numbers come from, for messages.
    """

    family: str
    frame_step: int = 4
    latent_frame_multiple: int = 1
    size_multiple: tuple[int, int] = (16, 16)
    why: str = ""

    def frames_ok(self, n: int) -> bool:
        """Whether a clip of `n` frames fits."""
        return (
            n >= 1
            and (n - 1) % self.frame_step == 0
            and ((n - 1) // self.frame_step + 1) % self.latent_frame_multiple == 0
        )

    def frames_form(self) -> str:
        """The valid frame counts as a formula ("4k+1"; "8k+5" with a temporal patch of 2)."""
        step, m = self.frame_step, self.latent_frame_multiple
        return f"{step * m}k+{1 + step * (m - 1)}"

    def problems(
        self, num_frames: int, height: int, width: int, flags: tuple[str, str, str] = GENERATE_FLAGS
    ) -> list[str]:
        """One sentence per value that does not fit, naming its flag and the nearest values that do."""
        out = []
        if not self.frames_ok(num_frames):
            out.append(
                f"{_flag(flags[0], num_frames)} is not {self.frames_form()} for {self.family}: use "
                f"{nearest_values(num_frames, self.frames_ok)}"
            )
        for flag, value, multiple in (
            (flags[1], height, self.size_multiple[0]),
            (flags[2], width, self.size_multiple[1]),
        ):
            if value < multiple or value % multiple:
                out.append(
                    f"{_flag(flag, value)} is not a multiple of {multiple} for {self.family}: use "
                    f"{nearest_values(value, lambda v, m=multiple: v >= m and v % m == 0)}"
                )
        return out


def _flag(flag: str, value: int) -> str:
    return f"{flag}{value}" if flag.endswith("=") else f"{flag} {value}"


def nearest_values(value: int, ok: Callable[[int], bool], span: int = 4096) -> str:
    """ "A or B": the nearest positive values below and above `value` for which `ok` holds (only B when none is
    below), for messages that say what to use instead."""
    below = next((v for v in range(int(value) - 1, 0, -1) if ok(v)), None)
    above = next(v for v in range(max(int(value) + 1, 1), int(value) + span) if ok(v))
    return str(above) if below is None else f"{below} or {above}"


def config_value(config: Mapping[str, Any] | Any | None, key: str, default: Any = None) -> Any:
    """`key` of a model config (a diffusers config object or its JSON dict), `default` when absent or None."""
    if config is None:
        return default
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    value = get(key, None)
    return default if value is None else value


def folder_config(model: str | Path | None, subfolder: str) -> dict | None:
    """A pipeline folder's component config (MODEL/SUBFOLDER/config.json) read as JSON, without loading any
    weights; None when `model` is not a local folder holding it (e.g. a hub id)."""
    if model is None:
        return None
    path = Path(model) / subfolder / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


class BackboneSpec:
    """Interface of a video-DiT family (diffusers classes, loaded unmodified)."""

    name: str = ""
    objective: str = ""  # "v_prediction" | "flow_matching"
    latent_layout: str = ""  # "BFCHW" (CogVideoX) | "BCFHW" (Wan)
    pipeline_class: type  # the family's diffusers pipeline (generation, `load_lora_weights`)
    transformer_class_name: str = ""  # the diffusers transformer class

    def load_transformer(self, path: str, torch_dtype: torch.dtype | None = None) -> nn.Module:
        """The transformer from a diffusers pipeline folder (its transformer/), a transformer folder, or a hub id."""
        import diffusers

        cls = getattr(diffusers, self.transformer_class_name)
        kw = dtype_kwargs(torch_dtype)
        p = Path(path)
        with loading(f"the {self.transformer_class_name}", path):
            if (p / "transformer" / "config.json").is_file():
                return cls.from_pretrained(p, subfolder="transformer", **kw)
            if (p / "config.json").is_file():
                return cls.from_pretrained(p, **kw)
            if p.exists() or path.startswith((".", "/")):
                raise MoalignError(
                    f"{path} is neither a diffusers pipeline folder (with transformer/config.json) nor a "
                    f"{self.transformer_class_name} folder (with config.json). Pass the downloaded model's folder."
                )
            return cls.from_pretrained(path, subfolder="transformer", **kw)  # a hub id

    def geometry_rule(
        self, transformer_config: Any = None, vae_config: Any = None, *, training: bool = False
    ) -> GeometryRule:
        """The clip geometry this family accepts, read from the transformer's and VAE's configs (diffusers config
        objects or their JSON dicts; None: the family's released values). `training`: clips encoded for
        training the transformer on (a temporal patch must then fit the latent frames; sampling pads them)."""
        raise NotImplementedError

    def check_geometry(
        self,
        num_frames: int,
        height: int,
        width: int,
        *,
        what: str,
        flags: tuple[str, str, str] = GENERATE_FLAGS,
        transformer_config: Any = None,
        vae_config: Any = None,
        training: bool = False,
    ) -> None:
        """Check a clip geometry (frames, pixels) before any work starts.

        Args:
            num_frames, height, width: the clip geometry.
            what: who asks, for the message ("generate", "latents of --data").
            flags: how the user sets the three values (default --num-frames, --height, --width; a label ending
                in "=" is written without a space, e.g. "--set validation_frames=").
            transformer_config, vae_config, training: see `geometry_rule`.

        Raises:
            MoalignError: a value does not fit; one message naming each such flag, the rule and the nearest
                valid values below and above (e.g. "--num-frames 16 is not 4k+1 for cogvideox: use 13 or 17").
        """
        rule = self.geometry_rule(transformer_config, vae_config, training=training)
        problems = rule.problems(num_frames, height, width, flags)
        if problems:
            raise MoalignError(f"{what}: {'; '.join(problems)} ({rule.why})")

    def use_pipeline_scheduler(self, model: str) -> None:
        """Train with the noise schedule of the pipeline `model` samples with (a folder or hub id); a no-op for
        families whose training schedule does not come from the pipeline's scheduler."""

    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        """The transformer's block list; alignment layers index it, 0-based."""
        raise NotImplementedError

    def video_tokens(self, block_output: Any) -> torch.Tensor:
        """The video tokens (B, N, D), frame-major, from a block's raw output."""
        raise NotImplementedError

    def token_grid(self, transformer: nn.Module, latents: torch.Tensor) -> tuple[int, int, int]:
        """(F, H, W) token grid of latents in this family's layout."""
        raise NotImplementedError

    def predict(
        self,
        transformer: nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """The transformer's raw prediction, same layout as the latents (keyword arguments only)."""
        raise NotImplementedError

    def diffusion_loss(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        generator: torch.Generator | None = None,
        noise_level: float | None = None,
    ) -> LossParts:
        """Sample noise and timesteps, run the transformer once, return LossParts(diffusion, total).

        `noise_level` in [0, 1] fixes every sample's timestep instead of drawing it (held-out losses and probes
        at chosen noise levels, `moalign/evaluation/dit_probes.py`): the fraction of the family's training
        schedule, 0 clean, 1 pure noise (CogVideoX: timestep round(level * 999); Wan: sigma = level).
        """
        raise NotImplementedError

    max_sequence_length: int = 0  # text tokens the pipeline's encode_prompt pads to

    def text_length(self, transformer_config: Any = None) -> int:
        """Prompt length to pad to for a transformer config (dict or config object; None: the family default)."""
        return self.max_sequence_length

    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """uint8 clips (B, T, H, W, 3) -> training latents in this family's layout and scaling."""
        raise NotImplementedError

    def tiny_transformer(self, **overrides: Any) -> nn.Module:
        """A tiny instance of the family's real diffusers class, for CPU tests and the demo."""
        raise NotImplementedError

    def architecture(self, name: str) -> nn.Module:
        """A released model's transformer at real size on the meta device (no memory, no download): for shape
        checks. `name` is a key of the family module's ARCHITECTURES."""
        import importlib

        import diffusers

        table = importlib.import_module(type(self).__module__).ARCHITECTURES
        if name not in table:
            raise ValueError(f"unknown {self.name} architecture {name!r}; valid: {', '.join(table)}")
        with torch.device("meta"):
            return getattr(diffusers, self.transformer_class_name)(**table[name])


def compute_dtype(transformer: nn.Module) -> torch.dtype:
    """The dtype a transformer computes in: its weights' dtype, or the compute dtype of diffusers' layerwise
    casting (fp8 storage); inputs are cast to it, so latents or embeddings cached in another dtype fit."""
    model = unwrap(transformer)
    dtype = getattr(model, "dtype", None)  # diffusers models: the layerwise-casting compute dtype when set
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP / FSDP / accelerate wrapper: its config, blocks and hooks live there."""
    return getattr(module, "module", module)


Generators = torch.Generator | list[torch.Generator] | None


def per_sample(generator: Generators, draw, batch: int) -> torch.Tensor:
    """Random draws for a batch: `draw(n, gen)` returns n draws (along dim 0).

    With a list of generators (one per sample, seeded by the sample's global position in the step's batch) each
    sample draws from its own generator, so its noise does not depend on how the batch is split across
    processes: a two-process run then trains exactly like one process with the same global batch.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        return torch.cat([draw(1, g) for g in generator])
    return draw(batch, generator)


def check_noise_level(level: float) -> float:
    """A fixed noise level for `BackboneSpec.diffusion_loss`: a float in [0, 1], else a ValueError."""
    if not 0.0 <= float(level) <= 1.0:
        raise ValueError(f"noise_level must be in [0, 1] (0 clean, 1 pure noise), got {level}")
    return float(level)


def sample_noise(generator: Generators, latents: torch.Tensor) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, drawn on the CPU (per sample with a list of generators)."""
    shape = latents.shape[1:]
    noise = per_sample(
        generator, lambda n, g: torch.randn((n, *shape), generator=g, dtype=latents.dtype), len(latents)
    )
    return noise.to(latents.device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype names


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` name; an unknown name is a user error listing the valid ones."""
    if name not in DTYPES:
        raise MoalignError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_kwargs(torch_dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """`from_pretrained` kwargs for a dtype, only when one other than the default (float32) is asked for:
    diffusers 0.42 renamed `torch_dtype` to `dtype` and warns on the old name, which older releases still need."""
    return {} if torch_dtype in (None, torch.float32) else {"torch_dtype": torch_dtype}


def vae_posterior_mean(vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """uint8 clips (B, T, H, W, 3) -> the VAE posterior mean (B, C, F, h, w) of the frames mapped to [-1, 1]."""
    x = frames.permute(0, 4, 1, 2, 3).to(vae.device, vae.dtype) / 127.5 - 1.0  # (B, 3, T, H, W)
    return vae.encode(x).latent_dist.mode()


def frame_major(latents: torch.Tensor, layout: str) -> torch.Tensor:
    """Latents in a family layout -> (B, F, C, H, W)."""
    if layout == "BFCHW":
        return latents
    if layout == "BCFHW":
        return latents.permute(0, 2, 1, 3, 4)
    raise ValueError(f"unknown latent layout {layout!r}")

"""The frozen video encoder V of the paper's figure: a VideoMAE(v2) ViT that turns a clip into a token grid.

Stage 1 reads the output of one encoder block (by default the last block, before the final norm) as the
feature grid S of shape (F'', H'', W'', D_v) of the paper's Sec. 3.1 (MoAlign, arXiv 2510.19022); reading
it before the final norm is our choice (README.md, "Choices where the paper is silent"). The weights are a
`transformers.VideoMAEModel`, either converted from an official VideoMAEv2 checkpoint
(`moalign convert-videomaev2`) or trained by `moalign pretrain-encoder`.

The encoder is run at any clip geometry whose sizes divide by the patch and tubelet: the patch
embedding convolution is applied directly, and the fixed sin-cos position table is either interpolated
from the pre-training grid ("interpolate", the default) or recomputed for the new grid ("recompute",
what the official VideoMAEv2 code does when a model is built at a new size, and so what VideoREPA
gets).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moalign.backbones.spec import nearest_values
from moalign.errors import MoalignError, one_line
from moalign.tokens import tokens_to_grid

if TYPE_CHECKING:
    from transformers import VideoMAEModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_EMBED_MODES = ("interpolate", "recompute")


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoder to load and how clips are fed to it.

    Attributes:
        path: a folder holding a `VideoMAEModel` (made by `moalign convert-videomaev2` or
            `moalign pretrain-encoder`), or a hub id for `VideoMAEModel.from_pretrained`.
        layer: 0-based index of the block whose output is returned; -1 is the last block. The output
            is taken before any final norm (our choice: the paper's Sec. 3.1 does not say).
        input_size: (H, W) every frame is resized to (bicubic); both must divide by the patch size.
        drop_first_frame: drop frame 0 so that a 4k+1 clip gives 4k encoder frames (VideoREPA: 49 -> 48).
        pos_embed: "interpolate" (trilinear interpolation of the pre-training sin-cos table, laid out
            on its (T0, H0, W0) grid) or "recompute" (a fresh sin-cos table over the flattened index of
            the new grid, as the official VideoMAEv2 code builds it at a new size).
        mean: per-channel mean for normalisation of [0, 1] RGB values.
        std: per-channel standard deviation for normalisation.

    Field values are checked here (ValueError); `layer` and `input_size` are checked against the
    model when the encoder is built (ValueError; MoalignError from `VideoEncoder.from_pretrained`).
    """

    path: str | None = None
    layer: int = -1
    input_size: tuple[int, int] = (160, 240)
    drop_first_frame: bool = True
    pos_embed: str = "interpolate"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.pos_embed not in POS_EMBED_MODES:
            raise ValueError(
                f"encoder pos_embed={self.pos_embed!r} is not a known mode; "
                f"use one of {list(POS_EMBED_MODES)}."
            )
        if len(self.input_size) != 2 or any(int(s) <= 0 for s in self.input_size):
            raise ValueError(f"encoder input_size={self.input_size!r} must be two positive sizes (H, W).")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(
                f"encoder mean={self.mean!r} / std={self.std!r} must be three values each, std > 0."
            )


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed VideoMAE sin-cos table over a flattened index: (1, num_positions, dim), float32.

    Same values as `get_sinusoid_encoding_table` in the official VideoMAE(v2) code and in transformers:
    angle(n, j) = n / 10000^(2 * (j // 2) / dim), sin on even j, cos on odd j (computed in float64).
    """
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    div = np.power(10000, 2 * (np.arange(dim) // 2) / dim)
    table = pos / div  # (N, dim)
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.from_numpy(table).float().unsqueeze(0)


def interpolate_pos_embed(
    table: torch.Tensor, src_grid: tuple[int, int, int], dst_grid: tuple[int, int, int]
) -> torch.Tensor:
    """Resample a position table laid out frame-major on `src_grid` to `dst_grid` (trilinear).

    Args:
        table: (1, T0 * H0 * W0, D) position table, frame-major (t, h, w) order.
        src_grid: (T0, H0, W0), the grid the table was made for.
        dst_grid: (T, H, W), the grid wanted.

    Returns:
        (1, T * H * W, D) table in the dtype of `table`. When the grids are equal, `table` itself is
        returned unchanged (bit-identical). Interpolation runs in float32 with align_corners=False, so
        an axis whose size does not change is copied exactly.
    """
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return table
    t0, h0, w0 = src_grid
    if table.shape[1] != t0 * h0 * w0:
        raise ValueError(
            f"position table has {table.shape[1]} entries, not the {t0}x{h0}x{w0} grid {src_grid}"
        )
    d = table.shape[-1]
    grid = table.float().reshape(1, t0, h0, w0, d).permute(0, 4, 1, 2, 3)  # (1, D, T0, H0, W0)
    grid = F.interpolate(grid, size=dst_grid, mode="trilinear", align_corners=False)  # (1, D, T, H, W)
    return grid.permute(0, 2, 3, 4, 1).reshape(1, math.prod(dst_grid), d).to(table.dtype)


def _pair(x) -> tuple[int, int]:
    if isinstance(x, (list, tuple)):
        return int(x[0]), int(x[1])
    return int(x), int(x)


def preprocess_frames(frames: torch.Tensor | np.ndarray, cfg: EncoderConfig) -> torch.Tensor:
    """uint8 RGB clips -> normalised encoder input.

    Drops frame 0 (if configured), resizes every frame to `cfg.input_size` (bicubic, antialiased when
    shrinking, values clamped to [0, 1]) and normalises with `cfg.mean` / `cfg.std`.

    Args:
        frames: uint8 (B, T, H, W, 3) RGB clips, tensor or numpy array.

    Returns:
        float32 pixel values (B, T', 3, h, w) on the device of `frames`, with T' = T - 1 when
        frame 0 is dropped and (h, w) = `cfg.input_size`.

    Raises:
        ValueError: not a uint8 5-d RGB tensor.
    """
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 clips of shape (B, T, H, W, 3), got {tuple(frames.shape)}; add a batch axis "
            "with frames[None] for one clip."
        )
    if frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames (0..255), got {frames.dtype}.")
    b = frames.shape[0]
    if cfg.drop_first_frame:
        frames = frames[:, 1:]
    t = frames.shape[1]
    in_h, in_w = frames.shape[2:4]
    out_h, out_w = cfg.input_size
    x = frames.permute(0, 1, 4, 2, 3).reshape(b * t, 3, in_h, in_w).float() / 255.0  # (B*T', 3, H, W)
    if (in_h, in_w) != (out_h, out_w):
        shrink = out_h < in_h or out_w < in_w
        x = F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=shrink)
        x = x.clamp_(0.0, 1.0)  # bicubic overshoots
    x = x.reshape(b, t, 3, out_h, out_w)  # (B, T', 3, h, w)
    mean = torch.tensor(cfg.mean, device=x.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, 1, 3, 1, 1)
    return (x - mean) / std


class VideoEncoder(nn.Module):
    """Frozen VideoMAE(v2) encoder returning the token grid of one block (pre-norm).

    Wraps a `transformers.VideoMAEModel`. All parameters are frozen and the module stays in eval mode
    (calling `.train()` on a parent does not switch it). Only the blocks 0..layer run; the later blocks
    are kept (so the state dict is unchanged) but never called.

    Attributes:
        width: token width D.
        patch_size: spatial patch size p (square patches).
        tubelet_size: temporal patch size t.
        num_layers: number of blocks in the model.
        layer_index: the 0-based index of the block whose output is returned (`cfg.layer`, a negative
            index resolved).
        pretrain_grid: (T0, H0, W0), the token grid of the model's pre-training geometry.
    """

    def __init__(self, model: VideoMAEModel, cfg: EncoderConfig):
        """Wrap and freeze a VideoMAEModel.

        Args:
            model: a `transformers.VideoMAEModel` (weights loaded).
            cfg: encoder settings; `cfg.layer` and `cfg.input_size` are checked against the model.

        Raises:
            ValueError: non-square patches, `cfg.layer` out of range or `cfg.input_size` not divisible by
                the patch size.
        """
        super().__init__()
        mcfg = model.config
        self.model = model
        self.cfg = cfg
        self.width = int(mcfg.hidden_size)
        ph, pw = _pair(mcfg.patch_size)
        if ph != pw:
            raise ValueError(f"encoder has non-square patches {ph}x{pw}; only square patches are supported.")
        self.patch_size = ph
        self.tubelet_size = int(mcfg.tubelet_size)
        self.num_layers = int(mcfg.num_hidden_layers)
        if not -self.num_layers <= cfg.layer < self.num_layers:
            raise ValueError(
                f"encoder layer={cfg.layer} is out of range for a {self.num_layers}-block encoder: use a "
                f"0-based block index in 0..{self.num_layers - 1}, or -1 for the last block (negative "
                "indices count from the end)."
            )
        self.layer_index = cfg.layer % self.num_layers
        h, w = cfg.input_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"encoder input_size={h}x{w} is not divisible by the patch size {self.patch_size}: "
                f"{self._size_hint(h, w)} (--set encoder.input_size=[H,W])."
            )
        img_h, img_w = _pair(mcfg.image_size)
        self.pretrain_grid = (
            int(mcfg.num_frames) // self.tubelet_size,
            img_h // self.patch_size,
            img_w // self.patch_size,
        )
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.requires_grad_(False)
        self.eval()

    def _size_hint(self, height: int, width: int) -> str:
        """ "height 72: use 64 or 80", for each size that is not a multiple of the patch."""
        p = self.patch_size
        return "; ".join(
            f"{name} {v}: use {nearest_values(v, lambda x: x % p == 0)}"
            for name, v in (("height", height), ("width", width))
            if v % p
        )

    def check_clip(self, num_frames: int, *, flag: str = "--num-frames") -> None:
        """Check, before any work starts, that clips of `num_frames` frames fill this encoder's tubelets.

        Raises:
            MoalignError: they do not; names `flag` and the nearest 4k+1 frame counts that fit (or, when none
                can with drop_first_frame off, says to turn it on).
        """
        try:
            self._encoder_frames(num_frames)
        except ValueError as err:
            raise MoalignError(f"{flag} {num_frames}: {err}") from err

    @classmethod
    def from_pretrained(cls, cfg: EncoderConfig, torch_dtype: torch.dtype | None = None) -> VideoEncoder:
        """Load a VideoMAEModel from `cfg.path` and wrap it.

        Args:
            cfg: encoder settings; `cfg.path` is a local folder (converted VideoMAEv2 checkpoint or a
                pretrain-encoder output) or a hub id.
            torch_dtype: load the weights in this dtype (default: as stored).

        Returns:
            The frozen encoder.

        Raises:
            MoalignError: the path is unset or missing, or holds something other than a VideoMAE model
                (the message says what was found and how to make an encoder folder), or the model does not
                fit `cfg` (layer out of range, input size not divisible by its patch).
        """
        from transformers import VideoMAEModel

        if cfg.path is None:
            raise MoalignError(
                "no encoder path given (EncoderConfig.path is None). Convert an official VideoMAEv2 "
                "checkpoint with `moalign convert-videomaev2 CHECKPOINT.pth OUT_DIR`, or train one on the "
                "playground with `moalign pretrain-encoder`, and pass that folder."
            )
        path = Path(cfg.path).expanduser()
        if path.exists():
            _check_videomae_folder(path)
        elif path.is_absolute() or cfg.path.startswith((".", "~")) or cfg.path.count("/") != 1:
            raise MoalignError(f"encoder folder not found: {cfg.path}. {_HOW_TO_MAKE}")
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        try:
            model, info = VideoMAEModel.from_pretrained(str(path), output_loading_info=True, **kwargs)
        except Exception as err:  # hub/network/format errors come in many types
            where = "a local folder" if path.exists() else "a hub id (no local folder has that name)"
            raise MoalignError(
                f"cannot load a VideoMAE encoder from {cfg.path!r} as {where}: {one_line(err)}. "
                f"{_HOW_TO_MAKE}"
            ) from err
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise MoalignError(
                f"encoder checkpoint {cfg.path} lacks {len(missing)} VideoMAE weights (e.g. {missing[:3]}), "
                f"so they would be random. {_HOW_TO_MAKE}"
            )
        try:
            return cls(model, cfg)
        except ValueError as err:  # the settings do not fit this checkpoint: a user error
            raise MoalignError(str(err)) from err

    def describe(self) -> str:
        """One line for the start-up log: architecture, the block used, geometry, frozen parameter count."""
        n = sum(p.numel() for p in self.parameters())
        return (
            f"VideoEncoder: {self.num_layers} blocks x {self.width}-d, output of block {self.layer_index} "
            "(0-based, pre-norm), "
            f"patch {self.patch_size}, tubelet {self.tubelet_size}, input {self.cfg.input_size[0]}x"
            f"{self.cfg.input_size[1]}, pos_embed {self.cfg.pos_embed}, {n:,} parameters (all frozen)"
        )

    def train(self, mode: bool = True) -> VideoEncoder:
        """Stay in eval mode: the encoder is frozen (a parent's `.train()` must not switch it)."""
        return super().train(False)

    def grid(
        self, num_frames: int, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int]:
        """Token grid (F'', H'', W'') produced for a clip.

        Args:
            num_frames: frames in the clip, before frame 0 is dropped (e.g. 49).
            height: frame height the encoder sees (default `cfg.input_size[0]`, which `preprocess` resizes
                to); pass it when calling `forward` on pixel values of another size.
            width: likewise for the width (default `cfg.input_size[1]`).

        Returns:
            (F'', H'', W'') = (T' / tubelet, height / patch, width / patch), with T' the encoder frames.

        Raises:
            ValueError: T' does not divide by the tubelet size or a size by the patch size.
        """
        height = self.cfg.input_size[0] if height is None else height
        width = self.cfg.input_size[1] if width is None else width
        frames = self._encoder_frames(num_frames)
        self._check_size(height, width)
        return frames // self.tubelet_size, height // self.patch_size, width // self.patch_size

    def _fills_tubelets(self, num_frames: int) -> bool:
        frames = num_frames - 1 if self.cfg.drop_first_frame else num_frames
        return frames > 0 and frames % self.tubelet_size == 0

    def _encoder_frames(self, num_frames: int) -> int:
        frames = num_frames - 1 if self.cfg.drop_first_frame else num_frames
        if not self._fills_tubelets(num_frames):
            t = self.tubelet_size

            def fits(n: int) -> bool:  # clips are 4k+1 frames (DataConfig: what the video VAEs need)
                return (n - 1) % 4 == 0 and self._fills_tubelets(n)

            if self.cfg.drop_first_frame:
                hint = (
                    f"frame 0 is dropped and the other frames must fill tubelets of {t}: use "
                    f"{nearest_values(num_frames, fits)} frames (4k+1, as every clip)"
                )
            elif any(fits(n) for n in range(1, 8 * t)):
                hint = (
                    f"the frames must fill tubelets of {t} (drop_first_frame is off): use "
                    f"{nearest_values(num_frames, fits)} frames (4k+1, as every clip)"
                )
            else:
                hint = (
                    f"4k+1-frame clips cannot fill tubelets of {t} with drop_first_frame off: turn it on "
                    "(--set encoder.drop_first_frame=true; VideoREPA: 49 frames -> 48)"
                )
            raise ValueError(f"a clip of {num_frames} frames gives {frames} encoder frames: {hint}.")
        return frames

    def _check_size(self, height: int, width: int) -> None:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"frame size {height}x{width} is not divisible by the encoder patch size {self.patch_size}: "
                f"{self._size_hint(height, width)} (preprocess resizes to cfg.input_size)."
            )

    def preprocess(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 RGB clips (B, T, H, W, 3) -> normalised encoder input (B, T', 3, h, w); see `preprocess_frames`.

        Also checks that T' fills whole tubelets of this model (else ValueError: use 4k+1 frames).
        """
        self._encoder_frames(frames.shape[1])
        return preprocess_frames(frames, self.cfg)

    def position_table(
        self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Position table (1, F*H*W, D) for a token grid, cached per grid, device and dtype.

        At the pre-training grid this is the model's own table; elsewhere it is interpolated or
        recomputed according to `cfg.pos_embed`.
        """
        key = (tuple(grid), str(device), dtype)
        table = self._pos_cache.get(key)
        if table is None:
            base = self.model.embeddings.position_embeddings  # (1, T0*H0*W0, D), a plain tensor
            if tuple(grid) == self.pretrain_grid:
                table = base
            elif self.cfg.pos_embed == "interpolate":
                table = interpolate_pos_embed(base, self.pretrain_grid, grid)
            else:
                table = sinusoid_table(math.prod(grid), self.width)
            table = table.detach().to(device=device, dtype=dtype)
            self._pos_cache[key] = table
        return table

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token grid of block `layer` (before any final norm).

        Args:
            pixel_values: (B, T', 3, h, w) normalised frames (see `preprocess`); T' divisible by the
                tubelet, h and w by the patch. Moved to the model's device and dtype.

        Returns:
            (B, F'', H'', W'', D) tokens, F'' = T' / tubelet, H'' = h / patch, W'' = w / patch. No
            autograd graph is recorded (the encoder is frozen).
        """
        if pixel_values.dim() != 5 or pixel_values.shape[2] != 3:
            raise ValueError(f"expected pixel values (B, T, 3, H, W), got {tuple(pixel_values.shape)}.")
        b, t, _, h, w = pixel_values.shape
        if t % self.tubelet_size:
            raise ValueError(f"{t} frames do not fill tubelets of {self.tubelet_size}; use 4k+1-frame clips.")
        self._check_size(h, w)
        grid = (t // self.tubelet_size, h // self.patch_size, w // self.patch_size)
        proj = self.model.embeddings.patch_embeddings.projection
        x = pixel_values.to(device=proj.weight.device, dtype=proj.weight.dtype)
        x = proj(x.permute(0, 2, 1, 3, 4))  # (B, D, F'', H'', W'')
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), frame-major
        x = x + self.position_table(grid, x.device, x.dtype)
        for block in self.model.encoder.layer[: self.layer_index + 1]:
            x = block(x)
        return tokens_to_grid(x, grid)  # (B, F'', H'', W'', D)

    def encode(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) clips -> (B, F'', H'', W'', D) tokens: `preprocess` then `forward`.

        The uint8 frames are moved to the model's device first (resizing runs there).
        """
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        device = self.model.embeddings.patch_embeddings.projection.weight.device
        return self(self.preprocess(frames.to(device)))


_HOW_TO_MAKE = (
    "An encoder folder holds a transformers VideoMAEModel (config.json with model_type 'videomae' and its "
    "weights): make one from an official VideoMAEv2 checkpoint with `moalign convert-videomaev2 "
    "CHECKPOINT.pth OUT_DIR`, or train one on the playground with `moalign pretrain-encoder`."
)


def _check_videomae_folder(path: Path) -> None:
    """Raise a MoalignError saying what `path` is when it is not a VideoMAE model folder."""
    if path.is_file():
        hint = ""
        if path.suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt"):
            hint = " It looks like a raw checkpoint: convert it with "
            hint += f"`moalign convert-videomaev2 {path} OUT_DIR`."
        raise MoalignError(f"encoder path {path} is a file, not a model folder.{hint} {_HOW_TO_MAKE}")
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = "<unreadable config.json>"
        if model_type == "videomae":
            return
        found = f"a config.json with model_type={model_type!r}"
        if model_type is None and "_class_name" in config_file.read_text():
            found = "a diffusers model config.json (has _class_name)"
    elif (path / "model_index.json").is_file():
        found = "a diffusers pipeline folder (model_index.json)"
    else:
        names = sorted(p.name for p in path.iterdir())
        found = f"no config.json (contents: {names[:8]}{' ...' if len(names) > 8 else ''})"
        subs = [p.parent.name for p in path.glob("*/config.json") if _is_videomae_config(p)]
        if subs:
            found += f"; a VideoMAE model is in the subfolder {path / subs[0]}: pass that instead"
    raise MoalignError(f"encoder path {path} is not a VideoMAE model folder: found {found}. {_HOW_TO_MAKE}")


def _is_videomae_config(config_file: Path) -> bool:
    try:
        return json.loads(config_file.read_text()).get("model_type") == "videomae"
    except (OSError, ValueError, AttributeError):
        return False

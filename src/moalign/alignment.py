"""The stage-2 objective: L_total = L_diffusion + lambda * L_align (MoAlign, arXiv 2510.19022, Sec. 3.2).

`Aligner` holds P_zeta (one per aligned block) and turns the captured block tokens plus the cached teacher
targets into the alignment loss of the chosen mode. `stage2_loss` runs one training forward and is the one
place lambda is applied. Modes (the rows of the paper's ablation; docs/stage2.md):

| mode          | teacher tokens           | loss                                  |
|---------------|--------------------------|---------------------------------------|
| none          | -                        | diffusion only (the fine-tuning arm)  |
| repa          | raw encoder ("encoder")  | REPA: 1 - cosine per token            |
| trd           | raw encoder              | VideoREPA TRD (margin 0.1)            |
| raw-moalign   | raw encoder              | soft relational (spatial + temporal)  |
| motion-trd    | motion subspace ("motion") | TRD                                 |
| moalign       | motion subspace          | soft relational (MoAlign)             |
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from moalign.align_projector import AlignProjector, AlignProjectorConfig, resample_teacher
from moalign.backbones.spec import unwrap
from moalign.capture import FeatureCapture
from moalign.losses import LossParts, repa_loss, soft_relational_loss, token_relation_distillation
from moalign.run.checks import check_real
from moalign.tokens import grid_to_frames, grid_to_tokens

# mode -> (teacher key in the targets cache, loss name)
ALIGN_MODES: dict[str, tuple[str, str] | None] = {
    "none": None,
    "repa": ("encoder", "repa"),
    "trd": ("encoder", "trd"),
    "raw-moalign": ("encoder", "soft_relational"),
    "motion-trd": ("motion", "trd"),
    "moalign": ("motion", "soft_relational"),
}
MODE_TITLES = {  # what each mode is, for reports and model cards
    "none": "fine-tuned, no alignment",
    "repa": "REPA (raw features)",
    "trd": "VideoREPA TRD (raw features)",
    "raw-moalign": "raw features + MoAlign loss",
    "motion-trd": "motion features + TRD loss",
    "moalign": "MoAlign (motion subspace)",
}
LAMBDA_MAX = 1000.0
DEFAULT_MARGIN = {"trd": 0.1, "soft_relational": 0.0, "repa": 0.0}


@dataclass(frozen=True)
class AlignConfig:
    """Which alignment, where, and how strongly."""

    mode: str = "moalign"
    layers: tuple[int, ...] = (17,)  # 0-based block indices; the paper's "layer 18" of CogVideoX-2B is 17
    lam: float = 0.5  # lambda, applied once in `stage2_loss`
    tau: float = 10.0
    margin: float | None = None  # None: the loss's own default (TRD 0.1, MoAlign 0)
    projector: AlignProjectorConfig = field(default_factory=AlignProjectorConfig)

    def __post_init__(self) -> None:
        if self.mode not in ALIGN_MODES:
            raise ValueError(f"unknown align mode {self.mode!r}; valid: {', '.join(ALIGN_MODES)}")
        # lambda: 0.5 by default (the paper's scale); far above LAMBDA_MAX the alignment gradient swamps the
        # diffusion loss, and near float32's range (1e38) it overflows, clipping then zeroes every update
        check_real("align.lam (--lambda)", self.lam, 0.0, LAMBDA_MAX)
        check_real("align.tau", self.tau, 0.0, open_low=True)
        if self.margin is not None:
            check_real("align.margin", self.margin, 0.0, 2.0)  # cosine similarities differ by at most 2
        if not self.layers and self.mode != "none":
            raise ValueError(f"align mode {self.mode!r} needs at least one layer (--layers)")

    @property
    def teacher_key(self) -> str | None:
        spec = ALIGN_MODES[self.mode]
        return spec[0] if spec else None

    @property
    def loss_name(self) -> str | None:
        spec = ALIGN_MODES[self.mode]
        return spec[1] if spec else None


class Aligner(nn.Module):
    """P_zeta for each aligned block plus the alignment loss of the configured mode.

    Args:
        cfg: the alignment config (mode "none" builds no projector).
        hidden_dim: width of the transformer's tokens.
        teacher_dim: width of the teacher tokens (64 for motion, D_v for raw encoder tokens).
        latent_grid: (F, H, W) token grid of the transformer.
        teacher_grid: (F'', H'', W'') token grid of the teacher.
    """

    def __init__(
        self,
        cfg: AlignConfig,
        hidden_dim: int,
        teacher_dim: int,
        latent_grid: tuple[int, int, int],
        teacher_grid: tuple[int, int, int],
    ):
        super().__init__()
        self.cfg = cfg
        self.teacher_grid = tuple(teacher_grid)
        proj_cfg = replace(cfg.projector, out_dim=teacher_dim)
        n = 0 if cfg.mode == "none" else len(cfg.layers)
        self.projectors = nn.ModuleList(
            AlignProjector(proj_cfg, hidden_dim, latent_grid, teacher_grid) for _ in range(n)
        )

    def forward(self, captured: dict[int, torch.Tensor], teacher: torch.Tensor) -> LossParts:
        """captured: block index -> (B, N, D) tokens; teacher: (B, F'', H'', W'', D_t). -> LossParts (float32).

        Parts: `align` (mean over layers of the mode's loss) and, for the relational modes, `spatial` and
        `temporal` (also means over layers).
        """
        name = self.cfg.loss_name
        margin = self.cfg.margin if self.cfg.margin is not None else DEFAULT_MARGIN[name]
        sums: dict[str, torch.Tensor] = {}
        for proj, layer in zip(self.projectors, self.cfg.layers, strict=True):
            z = proj(captured[layer])  # (B, F, H, W, D_t) on the matched grid
            m = resample_teacher(teacher.to(z.dtype), proj.output_grid)  # identity for "videorepa"
            if name == "soft_relational":  # per-frame token groups (B, F, H*W, D)
                parts = soft_relational_loss(
                    grid_to_frames(z), grid_to_frames(m), tau=self.cfg.tau, margin=margin
                )
            elif name == "trd":  # all tokens (B, F*H*W, D)
                parts = token_relation_distillation(grid_to_tokens(z), grid_to_tokens(m), margin)
            else:
                parts = repa_loss(grid_to_tokens(z), grid_to_tokens(m))
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
        k = len(self.projectors)
        out = {("align" if key == "total" else key): value / k for key, value in sums.items()}
        return LossParts(out)


def stage2_loss(
    spec: Any,
    transformer: nn.Module,
    aligner: Aligner,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    teacher: torch.Tensor | None,
    generator: torch.Generator | list[torch.Generator] | None = None,  # a list: one per sample
) -> LossParts:
    """One stage-2 training forward: diffusion loss, alignment loss on the hooked blocks, and the total.

    Args:
        spec: the backbone spec (`moalign.backbones`).
        transformer: the video DiT (LoRA-wrapped or fully trainable).
        aligner: P_zeta + mode; with mode "none" no block is hooked.
        latents: clean latents in the family's layout.
        prompt_embeds: text embeddings (B, L, D_text).
        teacher: cached teacher tokens (B, F'', H'', W'', D_t) for the mode's teacher key, or None for "none".

    Returns:
        LossParts: `diffusion`, `align` (0 for "none"), `spatial`/`temporal` when relational, and
        `total` = diffusion + lambda * align (the only place lambda is applied).
    """
    cfg = unwrap(aligner).cfg  # attributes from the module; forwards through the (maybe DDP-wrapped) wrapper
    if cfg.mode == "none":
        parts = spec.diffusion_loss(transformer, latents, prompt_embeds, generator)
        zero = parts["diffusion"].new_zeros(())
        return LossParts(diffusion=parts["diffusion"], align=zero, total=parts["diffusion"])
    with FeatureCapture(spec.blocks(unwrap(transformer)), cfg.layers, select=spec.video_tokens) as cap:
        diff = spec.diffusion_loss(transformer, latents, prompt_embeds, generator)
        captured = {layer: cap[layer] for layer in cfg.layers}
    align = aligner(captured, teacher)
    total = diff["diffusion"] + cfg.lam * align["align"]
    return LossParts(diffusion=diff["diffusion"], **align, total=total)

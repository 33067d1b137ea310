"""Representation probes for stage-2 transformers: does the DiT come to hold motion? (the paper's mechanism)

On held-out clips with known flow, at a few fixed noise levels, the transformer runs once per clip (the same
noise for every model probed: one generator per clip, seeded by the clip's position) and every block's video
tokens are captured (`moalign/capture.py`). Reported per noise level:

- ``diffusion``: the held-out diffusion loss, the training objective of the family at that noise level
  (`BackboneSpec.diffusion_loss` with `noise_level`; CogVideoX's includes its 1 / (1 - alpha_t) weight).
- ``motion_r2`` per block: held-out R^2 of a ridge probe (`moalign/evaluation/probes.py`, fitted on the even
  clips, scored on the odd ones) from the block's tokens to the stage-1 motion tokens (the teacher cache's
  "motion", resampled to the DiT's token grid as the aligner resamples it, `align_projector.resample_teacher`).
- ``flow_r2`` per block: the same probe to the token-level flow (each encoder token's mean flow over its patch
  and frame pairs, `token_targets`, resampled to the DiT grid alike).

A model aligned at block k should show a change at k against an unaligned one (the `none` arm of
`moalign study`). For real-size models `tokens_per_clip` keeps a fixed random subset of token positions per
clip (the same for every model), so the captured features stay in memory.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moalign.align_projector import resample_teacher
from moalign.capture import FeatureCapture
from moalign.data.cache import Cache
from moalign.data.sampling import DataConfig
from moalign.errors import MoalignError
from moalign.evaluation.probes import probe_r2, token_targets

NOISE_LEVELS = (0.25, 0.5, 0.75)  # fractions of the training schedule (0 clean, 1 pure noise)


def probe_inputs(
    latents_cache: str | Path,
    targets_cache: str | Path,
    data_dir: str | Path,
    data: DataConfig,
    clips: int = 32,
) -> list[dict[str, torch.Tensor]]:
    """Per held-out clip: "latents" and "prompt_embeds" (latents cache), "motion" (F'', H'', W'', D_m) (targets
    cache) and "flow" (F'', H'', W'', 2) token flow from the dataset's exact flow files.

    Args:
        latents_cache, targets_cache: caches of the held-out clips (`moalign latents` / `moalign targets`).
        data_dir: the clips' dataset folder; its manifest rows need flow files (the playground writes them).
        data: the teacher's data config (the stage-1 run's), so the flow lines up with the motion tokens.
        clips: how many clips (the first ones); at least 4, half fit the probes and half score them.
    """
    from moalign.data.dataset import VideoClipDataset
    from moalign.latents import LATENTS_KIND
    from moalign.teacher import load_targets

    latents, targets = Cache(latents_cache, kind=LATENTS_KIND), load_targets(targets_cache)
    dataset = VideoClipDataset(data_dir, replace(data, skip_bad_videos=False))
    if len(dataset) != len(latents) or len(dataset) != len(targets):
        raise MoalignError(
            f"{data_dir} has {len(dataset)} clips, the caches {latents.root} and {targets.root} hold "
            f"{len(latents)} and {len(targets)}: make both caches from this folder"
        )
    if any(r.flow is None for r in dataset.records):
        raise MoalignError(f"the probes need exact flow: {data_dir}'s manifest rows have no flow files")
    n = min(clips, len(dataset))
    if n < 4:
        raise MoalignError(f"the probes need at least 4 held-out clips, {data_dir} has {len(dataset)}")
    out = []
    for i in range(n):
        sample, motion = dataset[i], targets[i]["motion"].float()
        flow, _ = token_targets(np.asarray(sample["frames"]), sample["flow"], tuple(motion.shape[:3]))
        item = latents[i]
        out.append(
            {
                "latents": item["latents"].float(),
                "prompt_embeds": item["prompt_embeds"].float(),
                "motion": motion,
                "flow": torch.from_numpy(flow).reshape(*motion.shape[:3], 2).float(),
            }
        )
    return out


@torch.no_grad()
def transformer_probes(
    transformer: nn.Module,
    spec: Any,
    inputs: list[dict[str, torch.Tensor]],
    noise_levels: tuple[float, ...] = NOISE_LEVELS,
    seed: int = 0,
    batch_size: int = 8,
    tokens_per_clip: int | None = 1024,
    alpha: float = 1.0,
) -> dict[str, Any]:
    """Held-out diffusion loss and per-block probe R^2 of a transformer at each noise level.

    Args:
        transformer: the family's diffusers transformer (eval mode is set here).
        spec: its backbone spec (`moalign.backbones`).
        inputs: from `probe_inputs`.
        noise_levels: fractions of the training schedule, each in [0, 1].
        seed: noise seed; clip i draws from seed * 1_000_003 + i, whatever the batch size.
        tokens_per_clip: probe at most this many token positions per clip (a fixed random subset); None: all.

    Returns:
        {"noise_levels": [...], "clips": n, "blocks": B, "per_level": [{"noise_level", "diffusion",
        "motion_r2": [B floats], "flow_r2": [B floats]}], "mean": {"diffusion", "motion_r2", "flow_r2"}}.
    """
    transformer.eval()
    device = next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    blocks = spec.blocks(transformer)
    train = [i % 2 == 0 for i in range(len(inputs))]  # even clips fit the probes, odd clips score them
    per_level = []
    for level in noise_levels:
        feats: list[list[np.ndarray]] = [[] for _ in blocks]
        motion, flow, fit, loss_sum = [], [], [], 0.0
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            lat = torch.stack([b["latents"] for b in batch]).to(device, dtype)
            emb = torch.stack([b["prompt_embeds"] for b in batch]).to(device, dtype)
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + k) for k in range(len(batch))]
            with FeatureCapture(blocks, range(len(blocks)), select=spec.video_tokens) as cap:
                loss = spec.diffusion_loss(transformer, lat, emb, gens, noise_level=level).diffusion
            loss_sum += float(loss) * len(batch)
            grid = spec.token_grid(transformer, lat)
            keep = _token_subset(int(np.prod(grid)), tokens_per_clip, seed)
            for k in range(len(blocks)):
                tokens = cap[k].float()[:, keep]  # (B, N_kept, D)
                feats[k].append(tokens.reshape(-1, tokens.shape[-1]).cpu().numpy())
            for j, b in enumerate(batch):
                for name, rows in (("motion", motion), ("flow", flow)):
                    target = resample_teacher(b[name][None], grid)[0].reshape(-1, b[name].shape[-1])
                    rows.append(target[keep].numpy())
                fit.append(np.full(len(keep), train[start + j]))
        fit_rows = np.concatenate(fit)
        x = [np.concatenate(f) for f in feats]
        per_level.append(
            {
                "noise_level": float(level),
                "diffusion": loss_sum / len(inputs),
                "motion_r2": [probe_r2(xk, np.concatenate(motion), fit_rows, alpha) for xk in x],
                "flow_r2": [probe_r2(xk, np.concatenate(flow), fit_rows, alpha) for xk in x],
            }
        )
    mean = {
        "diffusion": float(np.mean([p["diffusion"] for p in per_level])),
        **{key: np.mean([p[key] for p in per_level], axis=0).tolist() for key in ("motion_r2", "flow_r2")},
    }
    return {
        "noise_levels": [float(v) for v in noise_levels],
        "clips": len(inputs),
        "blocks": len(blocks),
        "per_level": per_level,
        "mean": mean,
    }


def _token_subset(n: int, keep: int | None, seed: int) -> torch.Tensor:
    """Sorted token positions to probe: all n, or a fixed random `keep` of them (the same for every model)."""
    if keep is None or keep >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values


def probe_run(
    model: str | Path,
    inputs: list[dict[str, torch.Tensor]],
    state: str | Path | None = None,
    device: str = "cpu",
    **kwargs: Any,
) -> dict[str, Any]:
    """`transformer_probes` of a stage-2 run (its LoRA or transformer/) or a pipeline folder, loaded as
    `moalign generate` loads it but without text encoder and VAE; `state` optionally loads a full fine-tune's
    checkpoint (`RUN/checkpoint-N/transformer_trainable.safetensors`) on top, for learning curves."""
    import json

    from moalign.generate import load_pipeline
    from moalign.run.checkpoint import load_module_file

    pipe, spec = load_pipeline(model, transformer_only=True)
    transformer = pipe.transformer
    if state is not None:
        if Path(state).name != "transformer_trainable.safetensors":
            raise MoalignError(
                f"{state} is not a checkpoint's transformer weights: pass RUN/checkpoint-N/"
                "transformer_trainable.safetensors (the command also takes the checkpoint-N folder)"
            )
        weights, _ = load_module_file(Path(state), "transformer_trainable")
        _, unexpected = transformer.load_state_dict(weights, strict=False)
        if unexpected:
            raise MoalignError(
                f"{state} does not fit {model}'s transformer (unexpected keys {unexpected[:3]}): only a full "
                "fine-tune's checkpoints load on top of the transformer"
            )
    run_config = Path(model) / "config.json"
    config = json.loads(run_config.read_text()).get("config") if run_config.is_file() else None
    base = config.get("model") if isinstance(config, dict) and "align" in config else None
    spec.use_pipeline_scheduler(str(base or model))  # the noise schedule it was trained with
    return transformer_probes(transformer.to(device), spec, inputs, **kwargs)

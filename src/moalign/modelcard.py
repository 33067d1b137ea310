"""The model card a stage-2 run writes as RUN/README.md: base model, method, config, data, how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moalign.atomic import write_text

METHODS = {
    "none": "plain fine-tuning (diffusion loss only)",
    "repa": "REPA: per-token cosine alignment to raw video-encoder tokens",
    "trd": "VideoREPA token relation distillation (TRD) on raw video-encoder tokens",
    "raw-moalign": "MoAlign's soft relational loss on raw video-encoder tokens (ablation)",
    "motion-trd": "TRD on MoAlign's motion-subspace tokens (ablation)",
    "moalign": "MoAlign: soft relational alignment (spatial + temporally weighted) to the motion subspace",
}


def model_card(
    config: dict[str, Any], metrics: dict[str, Any], data: dict[str, Any], lora: bool, pipeline_class: str
) -> str:
    """The card's markdown (with the Hub's YAML header) for a finished run."""
    align = config["align"]
    base = config.get("model") or "(a transformer built in memory)"
    mode = align["mode"]
    transformer_class = (
        "WanTransformer3DModel" if config["backbone"] == "wan" else "CogVideoXTransformer3DModel"
    )
    imports = pipeline_class if lora else f"{pipeline_class}, {transformer_class}"
    aligned = (
        f"block(s) {list(align['layers'])} (0-based), lambda {align['lam']}, tau {align['tau']}, "
        f"margin {align['margin'] if align['margin'] is not None else 'the loss default'}"
        if mode != "none"
        else "none"
    )
    if lora:
        load = (
            f'pipe = {pipeline_class}.from_pretrained("{base}", torch_dtype=torch.bfloat16)\n'
            'pipe.load_lora_weights("RUN")  # this folder: pytorch_lora_weights.safetensors'
        )
        weights = f"LoRA rank {config['lora_rank']}, alpha {config['lora_alpha'] or config['lora_rank']}"
    else:
        load = (
            f'transformer = {transformer_class}.from_pretrained("RUN/transformer", torch_dtype=torch.bfloat16)\n'
            f'pipe = {pipeline_class}.from_pretrained("{base}", transformer=transformer, torch_dtype=torch.bfloat16)'
        )
        weights = "full fine-tune (transformer/)"
    scalars = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    header = f"base_model: {base}\n" if config.get("model") else ""  # the Hub's field, only for a real base
    return f"""---
{header}library_name: diffusers
tags: [text-to-video, moalign, {config["backbone"]}, align-{mode}]
---

# {config["backbone"]} fine-tuned with moalign ({mode})

- Base model: `{base}`
- Method: {METHODS.get(mode, mode)}; alignment at {aligned}. The alignment projector
  (`align_projector.safetensors`) is for training only: inference is the plain pipeline.
- Weights: {weights}.
- Training: {config["steps"]} steps, batch {config["batch_size"]} per process, lr {config["lr"]},
  mixed precision {config["mixed_precision"]}, seed {config["seed"]}.
- Data: {data.get("num_clips", "?")} clips, manifest sha256 `{str(data.get("manifest_sha256", "?"))[:16]}`,
  clip sampling {data.get("data", {})}.
- Final logged losses: {scalars or "n/a"}.

```python
import torch
from diffusers import {imports}

{load}
```

The full resolved config is in `config.json`, the loss log in `log.jsonl`, the curve in `loss_curve.png`.
"""


def write_model_card(run_dir: Path, *args: Any, **kwargs: Any) -> None:
    """Write RUN/README.md atomically (see `model_card`)."""
    write_text(Path(run_dir) / "README.md", model_card(*args, **kwargs))

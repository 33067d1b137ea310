"""The model card a stage-2 run writes as RUN/README.md: base model, method, config, data, how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moalign.alignment import MODE_TITLES
from moalign.run.atomic import write_text


def model_card(config: dict[str, Any], metrics: dict[str, Any], data: dict[str, Any], spec: Any) -> str:
    """The card's markdown (with the Hub's YAML header) for a finished run of the backbone `spec`."""
    align = config["align"]
    base = config.get("model") or "(a transformer built in memory)"
    mode = align["mode"]
    lora = config["lora_rank"] > 0
    pipeline_class, transformer_class = spec.pipeline_class.__name__, spec.transformer_class_name
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
- Method: {MODE_TITLES[mode]} (`--align {mode}`); alignment at {aligned}. The alignment projector
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

"""The model card a stage-2 run writes as RUN/README.md: huggingface_hub's model-card metadata (license,
pipeline tag, tags, base model, library), then base model, method, training, data, how to load it.
`moalign/run/hub.py` uploads a copy adapted to the Hub (`hub_card`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moalign.alignment import MODE_TITLES
from moalign.run.atomic import write_text

LICENSE_FIELDS = ("license", "license_name", "license_link")
RANDOM_MODEL = "tiny-random"  # = moalign.stage2.RANDOM_MODEL (a random tiny transformer: no base model)


def base_model_id(model: str | None) -> str | None:
    """The card's `base_model`: a hub id as given; a local folder as an ABSOLUTE path (a relative one means
    nothing once the card leaves the directory it was written from), or as its hub id when the folder is a
    snapshot in the Hub cache (.../models--ORG--NAME/snapshots/REVISION[/component]); None without a base (or `RANDOM_MODEL`)."""
    if not model or model == RANDOM_MODEL:
        return None
    path = Path(model).expanduser()
    if not path.exists():
        return model  # a hub id
    path = path.resolve()
    parts = path.parts
    if "snapshots" in parts:
        repo = parts[parts.index("snapshots") - 1]
        if repo.startswith("models--"):
            return repo[len("models--") :].replace("--", "/")  # the Hub cache's folder name for ORG/NAME
    return str(path)


def base_license(model: str | None) -> dict[str, str]:
    """license (with license_name and license_link, if any) of the base model's own card: a local folder's
    README.md (a component folder's pipeline folder's), or a hub id's README.md when it is already in the Hub
    cache (nothing is downloaded); {} when there is none."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    if not model or model == RANDOM_MODEL:
        return {}
    path = Path(model).expanduser()
    if path.exists():
        readmes = [path / "README.md", path.parent / "README.md"]  # a pipeline folder, or one of its parts
        readme = next((p for p in readmes if p.is_file()), None)
    else:
        try:
            cached = try_to_load_from_cache(model, "README.md")
        except ValueError:  # not a valid hub id either
            cached = None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None:
        return {}
    data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    return {k: data[k] for k in LICENSE_FIELDS if isinstance(data.get(k), str)}


def card_metadata(config: dict[str, Any]) -> Any:
    """The card's `ModelCardData`. The license is the config's `license` when it has one, else the base
    model's (`base_license`), else "other": a fine-tune inherits its base model's terms, which only the user
    can state."""
    from huggingface_hub import ModelCardData

    model = config.get("model")
    lora = config["lora_rank"] > 0
    licensing = {"license": config["license"]} if config.get("license") else base_license(model)
    tags = ["text-to-video", "diffusers", "moalign", *(["lora"] if lora else []), config["backbone"],
            f"align-{config['align']['mode']}"]  # fmt: skip
    return ModelCardData(
        base_model=base_model_id(model),
        library_name="diffusers",
        license=licensing.get("license", "other"),
        license_name=licensing.get("license_name"),
        license_link=licensing.get("license_link"),
        pipeline_tag="text-to-video",
        tags=tags,
    )


def training_line(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The card's training sentence: `batch_size` is the GLOBAL batch (clips per optimizer step), split over the
    processes and then into `gradient_accumulation_steps` micro-batches."""
    batch, processes = config["batch_size"], metrics.get("num_processes", 1)
    accumulation = config.get("gradient_accumulation_steps", 1)
    micro = batch // (processes * accumulation)
    return (
        f"{config['steps']} steps at a global batch of {batch} clips per optimizer step ({processes} "
        f"process{'es' if processes > 1 else ''} x {accumulation} micro-batch{'es' if accumulation > 1 else ''} "
        f"of {micro} clips per process), lr {config['lr']}, mixed precision {config['mixed_precision']}, "
        f"seed {config['seed']}"
    )


def model_card(config: dict[str, Any], metrics: dict[str, Any], data: dict[str, Any], spec: Any) -> str:
    """The card's markdown (with the Hub's YAML header) for a finished run of the backbone `spec`."""
    align = config["align"]
    card_data = card_metadata(config)
    base = card_data.base_model or "(none: a randomly initialised transformer)"
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
    losses = {k: v for k, v in metrics.items() if isinstance(v, float) and k != "train_seconds"}
    scalars = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
    licence_note = (
        "" if card_data.license != "other" else
        "\nLicense: `other` until stated. A fine-tune is bound by its base model's license, which moalign could "
        "not read from the base model's card: state it in the metadata above before sharing.\n"
    )  # fmt: skip
    return f"""---
{card_data.to_yaml()}
---

# {config["backbone"]} fine-tuned with moalign (`--align {mode}`)

- Base model: `{base}`
- Method: {MODE_TITLES[mode]} (`--align {mode}`); alignment at {aligned}. The alignment projector
  (`align_projector.safetensors`) is for training only: inference is the plain pipeline.
- Weights: {weights}.
- Training: {training_line(config, metrics)}.
- Data: {data.get("num_clips", "?")} clips, manifest sha256 `{str(data.get("manifest_sha256", "?"))[:16]}`,
  clip sampling {data.get("data", {})}.
- Losses at the end (means over the last logged steps, `metrics.json`): {scalars or "n/a"}.
{licence_note}
```python
import torch
from diffusers import {imports}

{load}
```

The full resolved config is in `config.json`, the loss log in `log.jsonl`, the curve in `loss_curve.png`.
"""


def write_model_card(run_dir: Path, *args: Any, **kwargs: Any) -> None:
    """Write RUN/README.md atomically (see `model_card`; arguments: config, metrics, data, spec)."""
    write_text(Path(run_dir) / "README.md", model_card(*args, **kwargs))


def hub_card(text: str, repo_id: str) -> str:
    """The card as uploaded to the Hub repo `repo_id`: the loading code reads from the repo instead of the run
    folder, and a base model that is a local path leaves the metadata (the Hub refuses a `base_model` that is
    not a Hub id; the card's text still names it)."""
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    if card.data.base_model and Path(card.data.base_model).is_absolute():
        card.data.base_model = None
    card.text = card.text.replace('load_lora_weights("RUN")', f'load_lora_weights("{repo_id}")').replace(
        'from_pretrained("RUN/transformer"', f'from_pretrained("{repo_id}", subfolder="transformer"'
    )
    return str(card)

"""LoRA on the video transformer (peft, through diffusers' adapter API) and saving it the way the family's
diffusers pipeline loads it: `pipe.load_lora_weights(RUN)` reads RUN/pytorch_lora_weights.safetensors.

The adapter's rank and alpha travel in the file's metadata, so a LoRA trained with alpha != rank (e.g. the
CogVideoX-5B recipe, rank 128 and alpha 64) loads with the same scale it was trained with.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections, as the diffusers examples do
LORA_FILE = "pytorch_lora_weights.safetensors"
# named groups of `lora_targets`: module-name suffixes peft matches in both families' blocks
LORA_TARGET_GROUPS = {
    "attention": LORA_TARGETS,  # self- and cross-attention q, k, v, out (CogVideoX attn1; Wan attn1, attn2)
    "feed-forward": ("net.0.proj", "net.2"),  # the blocks' FeedForward (CogVideoX ff.net.*, Wan ffn.net.*)
}


def lora_target_modules(targets: tuple[str, ...]) -> tuple[str, ...]:
    """`Stage2Config.lora_targets` -> module-name suffixes for peft: a group name ("attention",
    "feed-forward") stands for its modules, anything else is a module name (e.g. "proj_out")."""
    out: list[str] = []
    for t in targets:
        for name in LORA_TARGET_GROUPS.get(t, (t,)):
            if name not in out:
                out.append(name)
    return tuple(out)


def add_lora(
    transformer: nn.Module, rank: int, alpha: float, target_modules: tuple[str, ...] = LORA_TARGETS
) -> None:
    """Freeze the transformer and add a LoRA adapter (B initialised to zero: training starts at the base)."""
    from peft import LoraConfig

    from moalign.errors import MoalignError

    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(target_modules))
        )
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise MoalignError(
            f"cannot put LoRA on {list(target_modules)}: {str(err).splitlines()[0]}. Fix lora_targets (groups: "
            f"{', '.join(LORA_TARGET_GROUPS)}, or module names of the transformer)"
        ) from err


def save_lora(
    pipeline_class: type, transformer: nn.Module, out_dir: str | os.PathLike, state: dict | None = None
) -> Path:
    """Write OUT_DIR/pytorch_lora_weights.safetensors (atomically) for `pipeline_class.load_lora_weights`.

    Args:
        state: the transformer's weights when its own are sharded across processes (gathered by accelerate);
            None: read them from the module.
    """
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    state = get_peft_model_state_dict(transformer, state_dict=state)
    kwargs = {"transformer_lora_layers": state, "safe_serialization": True}
    if "transformer_lora_adapter_metadata" in inspect.signature(pipeline_class.save_lora_weights).parameters:
        kwargs["transformer_lora_adapter_metadata"] = transformer.peft_config["default"].to_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lora.", dir=out_dir))  # same filesystem: the rename is atomic
    try:
        pipeline_class.save_lora_weights(str(staging), **kwargs)
        os.replace(staging / LORA_FILE, out_dir / LORA_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / LORA_FILE

"""Official VideoMAEv2 checkpoints (.pth / .safetensors) -> a transformers `VideoMAEModel` folder.

VideoMAEv2 is in neither transformers nor timm, but its ViT is the `VideoMAEModel` architecture
(pre-norm blocks, q/v biases without a key bias, fixed sin-cos positions, LayerNorm eps 1e-6), so a key
remap is all it takes. Both official layouts load:

- pretrain (`pretrain_videomae_*`, e.g. `vit_g_hybrid_pt_1200e.pth`): `encoder.*` holds the ViT, the
  final `encoder.norm` becomes `layernorm` (use_mean_pooling=False); `decoder.*`,
  `encoder_to_decoder.*` and `mask_token` are dropped.
- finetune / distilled (`vit_*`, e.g. `vit_b_k710_dl_from_giant.pth`, the encoder VideoREPA and
  MoAlign use): top-level `patch_embed.*`, `blocks.*`; `fc_norm.*` and `head.*` (the classifier) are
  dropped and use_mean_pooling=True (no final norm); a LayerNorm `norm.*` becomes `layernorm`.

The architecture is read from the weights; heads, frame count and image size come from the
`argparse.Namespace` the official training scripts store beside the weights, when there is one.
`.pth` files are read with `torch.load(weights_only=True)`, allowing only `argparse.Namespace`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from moalign.encoder import sinusoid_table
from moalign.errors import MoalignError, one_line
from moalign.run.atomic import atomic_path

# Official model names -> attention heads (VideoMAEv2 models/modeling_{finetune,pretrain}.py).
HEADS_BY_NAME = {"small": 6, "base": 12, "large": 16, "huge": 16, "giant": 16}
# Fallback when no model name is known: the standard width of each size.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
LAYER_NORM_EPS = 1e-6  # VideoMAEv2 builds every LayerNorm with eps=1e-6
CONTAINER_KEYS = ("model", "module", "state_dict")
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.")
PATCH_KEY = "patch_embed.proj.weight"
_EXPECTED = (
    "an official VideoMAEv2 checkpoint: a dict of tensors (possibly under 'model', 'module' or 'state_dict') "
    "with either pretrain keys 'encoder.patch_embed.proj.weight', 'encoder.blocks.N.*' or finetune keys "
    "'patch_embed.proj.weight', 'blocks.N.*'"
)
_BLOCK_PARTS = {
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}


def load_official_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    """Read an official VideoMAEv2 checkpoint without executing arbitrary pickled code.

    Args:
        path: a `.pth`/`.pt`/`.bin` file written by `torch.save` (loaded with weights_only=True,
            allowing `argparse.Namespace`) or a `.safetensors` file.

    Returns:
        state_dict: the tensors, with `model` / `module` / `state_dict` containers unwrapped (prefixes
            are left as stored; `convert_state_dict` handles them).
        args: the training `argparse.Namespace` (under 'args' in official checkpoints), or None.

    Raises:
        MoalignError: the file is missing, unreadable, holds other pickled objects, or no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise MoalignError(
            f"checkpoint not found: {path}. Pass the path of a VideoMAEv2 .pth or .safetensors file."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu")), None
        except Exception as err:  # safetensors raises its own error types
            raise MoalignError(f"cannot read {path} as safetensors: {err}. Expected {_EXPECTED}.") from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError, ...
        raise MoalignError(
            f"cannot load {path} safely (torch.load with weights_only=True): "
            f"{one_line(err)}. Expected {_EXPECTED}. If the file holds other "
            "Python objects (optimizer classes, numpy values), re-save only the weights where you trust it: "
            "torch.save(torch.load(p, weights_only=False)['model'], 'weights.pth')."
        ) from err
    args = None
    while isinstance(obj, dict):
        found = obj.get("args")
        if isinstance(found, argparse.Namespace):
            args = found
        elif isinstance(found, dict) and args is None:
            args = argparse.Namespace(**found)
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise MoalignError(
            f"{path} holds a {type(obj).__name__}, not a dict of tensors. Expected {_EXPECTED}."
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise MoalignError(
            f"{path} holds a dict without tensors (keys: {sorted(map(str, obj))[:8]}). Expected {_EXPECTED}."
        )
    return tensors, args


def _find_prefix(keys: list[str]) -> str:
    """The prefix in front of the ViT's `patch_embed.proj.weight` (made only of known wrapper prefixes)."""
    candidates = sorted({k[: -len(PATCH_KEY)] for k in keys if k.endswith(PATCH_KEY)})
    known = [p for p in candidates if _is_wrapper_prefix(p)]
    if len(known) == 1:
        return known[0]
    if len(known) > 1:
        raise MoalignError(f"the checkpoint holds several ViTs (prefixes {known}); keep only one of them.")
    if candidates:
        raise MoalignError(
            f"the checkpoint has patch embeddings only under unexpected prefixes {candidates}; expected the "
            f"ViT at the top level or under 'encoder.' (optionally wrapped in {list(WRAPPER_PREFIXES)})."
        )
    sample = sorted(keys)[:6]
    if any("patch_embeddings.projection" in k for k in keys):
        raise MoalignError(
            "this is already a transformers VideoMAE state dict (keys like 'embeddings.patch_embeddings.*'), "
            "not an official VideoMAEv2 one: save the model with save_pretrained and use that folder as the "
            "encoder path."
        )
    raise MoalignError(
        f"no '{PATCH_KEY}' weight found (first keys: {sample}): this is not a VideoMAEv2 ViT checkpoint. "
        f"Expected {_EXPECTED}. Diffusers or moalign stage-1 checkpoints are not encoders."
    )


def _is_wrapper_prefix(prefix: str) -> bool:
    rest = prefix
    while rest:
        head = next((p for p in (*WRAPPER_PREFIXES, "encoder.") if rest.startswith(p)), None)
        if head is None:
            return False
        rest = rest[len(head) :]
    return True


def _num_heads(width: int, args: argparse.Namespace | None, num_heads: int | None) -> tuple[int, str]:
    """Attention heads and where the number came from (override, official model name, width)."""
    if num_heads is not None:
        heads, source = int(num_heads), "given (num_heads)"
    else:
        name = str(getattr(args, "model", "") or "")
        size = next((s for s in HEADS_BY_NAME if re.search(rf"(^|_){s}(_|$)", name)), None)
        if size is not None:
            heads, source = HEADS_BY_NAME[size], f"model name {name!r}"
        elif width in HEADS_BY_WIDTH:
            heads, source = HEADS_BY_WIDTH[width], f"standard width {width}"
        elif width % 64 == 0:
            heads, source = width // 64, f"width {width} / head size 64"
        else:
            raise MoalignError(
                f"cannot infer the number of attention heads for width {width} (no model name in the "
                "checkpoint): pass it with --num-heads."
            )
    if heads <= 0 or width % heads:
        raise MoalignError(f"{heads} heads do not divide the width {width}; pass the right --num-heads.")
    return heads, source


def convert_state_dict(
    state_dict: dict[str, torch.Tensor],
    args: argparse.Namespace | None = None,
    num_heads: int | None = None,
    layer_norm_eps: float | None = None,
):
    """Map an official VideoMAEv2 state dict to `transformers.VideoMAEModel` weights.

    Args:
        state_dict: official tensors, pretrain (`encoder.*`) or finetune (`blocks.*`) layout, with any
            of the wrapper prefixes `module.`, `model.`, `backbone.`, `_orig_mod.`.
        args: the training Namespace, if any: `model` (name -> heads), `num_frames`, `input_size`.
        num_heads: attention heads, overriding the inferred number.
        layer_norm_eps: LayerNorm epsilon (default 1e-6, as VideoMAEv2).

    Returns:
        config: a `VideoMAEConfig` describing the inferred architecture.
        new_state_dict: tensors named as `VideoMAEModel.state_dict()` expects (exactly those keys).
        report: layout, prefix, architecture, where the head count came from, dropped keys.

    Raises:
        MoalignError: not a VideoMAEv2 ViT, or it uses something VideoMAEModel cannot express
            (layer scale, a learned position table, a different attention width, cosine attention).
    """
    from transformers import VideoMAEConfig

    prefix = _find_prefix(list(state_dict))
    layout = "pretrain" if prefix.endswith("encoder.") else "finetune"
    # the phases below pop what they convert from `vit`; whatever is left has no place in VideoMAEModel
    vit = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    dropped = sorted(k for k in state_dict if not k.startswith(prefix))  # decoder.*, mask_token, cls heads

    new = _convert_patch_embedding(vit)
    width, channels, tubelet, patch, _ = new["embeddings.patch_embeddings.projection.weight"].shape
    blocks, depth, qv_bias, notes = _convert_blocks(vit, width)
    new.update(blocks)
    final_norm, classifier = _convert_final_norm(vit)
    new.update(final_norm)
    dropped += [prefix + key for key in classifier]
    num_frames, image_size = _geometry(args)
    pos_note = _drop_fixed_pos_embed(vit, width)
    if pos_note is not None:
        dropped.append(prefix + "pos_embed")
        notes.append(pos_note)
    _refuse_leftovers(vit)

    heads, heads_from = _num_heads(width, args, num_heads)
    intermediate = new["encoder.layer.0.intermediate.dense.weight"].shape[0]
    config = VideoMAEConfig(
        image_size=image_size,
        patch_size=int(patch),
        num_channels=int(channels),
        num_frames=num_frames,
        tubelet_size=int(tubelet),
        hidden_size=int(width),
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=int(intermediate),
        hidden_act="gelu",
        layer_norm_eps=LAYER_NORM_EPS if layer_norm_eps is None else float(layer_norm_eps),
        qv_bias=qv_bias,
        use_mean_pooling=not final_norm,
    )
    report = {
        "layout": layout,
        "prefix": prefix,
        "model_name": getattr(args, "model", None),
        "architecture": {
            "width": int(width),
            "depth": depth,
            "num_heads": heads,
            "num_heads_from": heads_from,
            "mlp_width": int(intermediate),
            "patch_size": int(patch),
            "tubelet_size": int(tubelet),
            "num_frames": num_frames,
            "image_size": image_size,
            "qv_bias": qv_bias,
            "layer_norm_eps": config.layer_norm_eps,
            "final_norm": "layernorm" if final_norm else None,
            "geometry_from": "checkpoint args" if args is not None else "defaults (16 frames, 224)",
        },
        "notes": notes,
        "dropped_keys": sorted(set(dropped)),
    }
    return config, new, report


def _convert_patch_embedding(vit: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Conv3d patch embedding (D, C, t, p, p); a missing bias becomes zeros."""
    proj = vit.pop("patch_embed.proj.weight")
    if proj.dim() != 5:
        raise MoalignError(
            f"patch_embed.proj.weight has shape {tuple(proj.shape)}, not a Conv3d (D, C, t, p, p)."
        )
    width, _, _, patch_h, patch_w = proj.shape
    if patch_h != patch_w:
        raise MoalignError(f"non-square patches {patch_h}x{patch_w} are not supported.")
    new: dict[str, torch.Tensor] = {"embeddings.patch_embeddings.projection.weight": proj}
    if "patch_embed.proj.bias" in vit:
        new["embeddings.patch_embeddings.projection.bias"] = vit.pop("patch_embed.proj.bias")
    else:
        new["embeddings.patch_embeddings.projection.bias"] = proj.new_zeros(width)
    return new


def _convert_blocks(
    vit: dict[str, torch.Tensor], width: int
) -> tuple[dict[str, torch.Tensor], int, bool, list[str]]:
    """The transformer blocks: their tensors, the depth, whether they have q/v biases, and notes."""
    depth = 1 + max((int(m.group(1)) for k in vit if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise MoalignError(
            f"the checkpoint has patch embeddings but no 'blocks.N.*' weights. Expected {_EXPECTED}."
        )
    new: dict[str, torch.Tensor] = {}
    notes = []
    qv_bias = "blocks.0.attn.q_bias" in vit or "blocks.0.attn.qkv.bias" in vit
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        try:
            qkv = vit.pop(src + "attn.qkv.weight")
            for part, name in _BLOCK_PARTS.items():
                new[dst + name] = vit.pop(src + part)
        except KeyError as err:
            raise MoalignError(f"block {i} lacks the weight {err.args[0]!r}. Expected {_EXPECTED}.") from None
        if qkv.shape != (3 * width, width):
            raise MoalignError(
                f"blocks.{i}.attn.qkv.weight has shape {tuple(qkv.shape)}, not (3*{width}, {width}): an "
                "attention width other than the model width (attn_head_dim) is not supported by "
                "VideoMAEModel."
            )
        att = dst + "attention.attention."
        new[att + "query.weight"], new[att + "key.weight"], new[att + "value.weight"] = qkv.chunk(3, dim=0)
        q_bias, v_bias = vit.pop(src + "attn.q_bias", None), vit.pop(src + "attn.v_bias", None)
        full_bias = vit.pop(src + "attn.qkv.bias", None)
        if full_bias is not None:
            # The key bias adds q . b_k to every score of a query: softmax ignores it, so dropping is exact.
            q_bias, _, v_bias = full_bias.chunk(3)
            if i == 0:
                notes.append(
                    "qkv.bias split into query/value biases; the key bias is dropped (no effect on softmax)"
                )
        if (q_bias is not None) != qv_bias or (v_bias is not None) != qv_bias:
            raise MoalignError(f"block {i} has q/v biases inconsistent with block 0.")
        if qv_bias:
            new[att + "query.bias"], new[att + "value.bias"] = q_bias, v_bias
    return new, depth, qv_bias, notes


def _convert_final_norm(vit: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The final LayerNorm as `layernorm.*` (empty when there is none), and the classifier keys dropped."""
    final_norm = None
    if "norm.weight" in vit:  # a LayerNorm on the tokens (pretrain encoder; finetune without mean pooling)
        final_norm = (vit.pop("norm.weight"), vit.pop("norm.bias", None))
    classifier = [k for k in vit if k.startswith(("fc_norm.", "head."))]  # the classifier on pooled tokens
    for key in classifier:
        vit.pop(key)
    if final_norm is None:
        return {}, classifier
    weight, bias = final_norm
    bias = bias if bias is not None else torch.zeros_like(weight)
    return {"layernorm.weight": weight, "layernorm.bias": bias}, classifier


def _geometry(args: argparse.Namespace | None) -> tuple[int, int | list[int]]:
    """Frame count and image size of the pre-training geometry: the checkpoint's args, else 16 and 224."""
    num_frames = int(getattr(args, "num_frames", None) or 16)
    image_size = getattr(args, "input_size", None) or 224
    image_size = int(image_size) if isinstance(image_size, (int, float)) else [int(s) for s in image_size]
    return num_frames, image_size


def _drop_fixed_pos_embed(vit: dict[str, torch.Tensor], width: int) -> str | None:
    """Drop a stored `pos_embed` equal to the fixed sin-cos table (a note), refuse a learned one."""
    pos = vit.pop("pos_embed", None)
    if pos is None:
        return None
    fixed = sinusoid_table(pos.shape[-2], width) if pos.dim() == 3 and pos.shape[-1] == width else None
    if fixed is None or not torch.allclose(pos.float(), fixed, atol=1e-4):
        raise MoalignError(
            "the checkpoint has a learned position table 'pos_embed' (not the fixed sin-cos one): "
            "VideoMAEModel only supports the fixed table, so this checkpoint cannot be converted."
        )
    return f"stored pos_embed equals the fixed sin-cos table ({pos.shape[-2]} positions): dropped"


def _refuse_leftovers(vit: dict[str, torch.Tensor]) -> None:
    """Weights no phase took have no place in VideoMAEModel: name the variant that has them."""
    if not vit:
        return
    leftover = sorted(vit)
    what = ""
    if any("gamma_" in k for k in leftover):
        what = " Layer scale (gamma_1/gamma_2, init_values > 0) is not part of VideoMAEModel."
    elif any(k.endswith(".scale") for k in leftover):
        what = " Cosine attention (cos_attn) is not part of VideoMAEModel."
    raise MoalignError(
        f"the checkpoint has {len(leftover)} weights that VideoMAEModel has no place for: "
        f"{leftover[:6]}.{what} This VideoMAEv2 variant is not supported."
    )


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_heads: int | None = None,
    layer_norm_eps: float | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert an official VideoMAEv2 checkpoint into a `VideoMAEModel` folder (safetensors).

    The folder is written under a temporary name and renamed when complete, and it is re-loaded with
    `VideoMAEModel.from_pretrained` before the rename to check that no weight is missing or unexpected.

    Args:
        checkpoint: official `.pth` (or `.safetensors`) file.
        out_dir: folder to create: config.json, model.safetensors and conversion.json.
        num_heads: attention heads, overriding the inferred number.
        layer_norm_eps: LayerNorm epsilon (default 1e-6).
        overwrite: replace an existing `out_dir`.

    Returns:
        The conversion report (also written to `out_dir/conversion.json`): source file, layout,
        inferred architecture, dropped keys, parameter count and dtype.

    Raises:
        MoalignError: `out_dir` exists (without overwrite), or the file is not a convertible checkpoint.
    """
    from transformers import VideoMAEModel

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MoalignError(
            f"{out_dir} already exists: choose another folder or pass --overwrite to replace it."
        )
    state_dict, args = load_official_checkpoint(checkpoint)
    try:
        config, new, report = convert_state_dict(state_dict, args, num_heads, layer_norm_eps)
    except MoalignError as err:
        raise MoalignError(f"cannot convert {checkpoint}: {err}") from None
    del state_dict
    dtypes = {t.dtype for t in new.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    report = {"source": str(Path(checkpoint).resolve()), **report, "dtype": str(dtype).removeprefix("torch.")}
    report["num_parameters"] = sum(t.numel() for t in new.values())

    with torch.device("meta"):
        model = VideoMAEModel(config)
    model.to(dtype)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in new.items()}, strict=True, assign=True)
    except RuntimeError as err:
        raise MoalignError(f"converted weights do not fit VideoMAEModel: {err}") from err
    del new
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        del model
        if report["num_parameters"] > 100_000_000:
            gc.collect()  # free a large model before the verification re-load
        _verify(tmp)
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    report["out_dir"] = str(out_dir)
    return report


def _verify(folder: Path) -> None:
    """Re-load the written folder; any missing or unexpected weight is a conversion bug."""
    from transformers import VideoMAEModel

    _, info = VideoMAEModel.from_pretrained(str(folder), output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise MoalignError(f"the converted folder does not load cleanly into VideoMAEModel: {bad}")

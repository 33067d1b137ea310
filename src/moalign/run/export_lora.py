"""Export a stage-2 LoRA run to the key layout ComfyUI loads: `export_lora(RUN)` ->
RUN/comfy/<run folder name>_comfy_lora.safetensors.

A LoRA run keeps RUN/pytorch_lora_weights.safetensors in the diffusers layout (`moalign.run.lora`):
`transformer.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), scaled by alpha / r, alpha in the
file's metadata. The `comfy` layout renames each module to the ComfyUI model's name for it and writes the
kohya-style trio ComfyUI's LoRA loader has always read:

    diffusion_model.<module>.lora_down.weight   lora_A (r, in)
    diffusion_model.<module>.lora_up.weight     lora_B (out, r)
    diffusion_model.<module>.alpha              alpha, 0-dim float32 (ComfyUI scales by alpha / r)

so the weight update B @ A * alpha / r is the same, bit for bit. Where the layout comes from
(repository: file):

- Loader: Comfy-Org/ComfyUI `comfy/lora.py` (`model_lora_keys_unet` maps "diffusion_model.<module>" to
  "<module>.weight" for every model; `load_lora` reads "<key>.alpha") and `comfy/weight_adapter/lora.py`
  (`LoRAAdapter.load` tries "lora_up"/"lora_down" first; "lora_B"/"lora_A" also load in recent versions).
  ComfyUI's own LoRA writer, `comfy_extras/nodes_lora_extract.py`, writes diffusion_model.* lora_up/lora_down.
- Wan2.1: the original module names of Wan-Video/Wan2.1 `wan/modules/model.py` (`blocks.N.self_attn.q/k/v/o`,
  `cross_attn.q/k/v/o`, `cross_attn.k_img/v_img`, `ffn.0`, `ffn.2`), which ComfyUI's `comfy/ldm/wan/model.py`
  keeps; the diffusers <-> original map is huggingface/diffusers `scripts/convert_wan_to_diffusers.py`
  (TRANSFORMER_KEYS_RENAME_DICT). diffusers reads this layout back (`lora_conversion_utils.py`,
  `_convert_non_diffusers_wan_lora_to_diffusers`), which tests/test_export_lora.py uses as an independent
  check.
- CogVideoX: ComfyUI's native model, Comfy-Org/ComfyUI `comfy/ldm/cogvideo/model.py` (`CogVideoXBlock` under
  `blocks.N`: separate `q`, `k`, `v`, `attn_out`, `ff_proj`, `ff_out`; `CogVideoX_T2V` in
  `comfy/supported_models.py`). Its q/k/v are separate Linears, so each diffusers to_q/to_k/to_v adapter maps
  one to one and nothing is fused. The SAT original (THUDM/CogVideo `sat/`) fuses q/k/v into
  `attention.query_key_value` and keeps a LoRA on it as three partitions `matrix_A.{0,1,2}`,
  `matrix_B.{0,1,2}` (THUDM/SwissArmyTransformer `sat/model/finetune/lora2.py`): the exact rank-3r block form
  of the fused update (A stacked, B block-diagonal). SAT is not a target here; docs/export.md says why and
  lists the CogVideoX loaders that take RUN/pytorch_lora_weights.safetensors as it is.

Only the modules a layout names are exported; any other key (a LoRA on another module, a bias, DoRA) is a
MoalignError naming it. The output's metadata records format, family, rank and alpha.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moalign import __version__
from moalign.errors import MoalignError
from moalign.run.atomic import save_safetensors
from moalign.run.lora import LORA_FILE


@dataclass(frozen=True)
class Layout:
    """Where a family's LoRA modules live in a target layout: per block, diffusers module -> target module."""

    family: str
    blocks: str  # the diffusers block list inside the transformer
    target_blocks: str  # the same list in the target layout, prefix included
    modules: dict[str, str]  # module inside a diffusers block -> module inside a target block
    source: str  # "repository: file" the target names come from

    def target(self, module: str) -> str | None:
        """The target name of a diffusers module path such as 'blocks.3.attn1.to_q'; None without one."""
        m = re.fullmatch(rf"{re.escape(self.blocks)}\.(\d+)\.(.+)", module)
        if m is None or m[2] not in self.modules:
            return None
        return f"{self.target_blocks}.{m[1]}.{self.modules[m[2]]}"


# (format, backbone) -> layout; see the module docstring for the sources.
LAYOUTS: dict[tuple[str, str], Layout] = {
    ("comfy", "wan"): Layout(
        family="wan",
        blocks="blocks",
        target_blocks="diffusion_model.blocks",
        modules={
            "attn1.to_q": "self_attn.q",
            "attn1.to_k": "self_attn.k",
            "attn1.to_v": "self_attn.v",
            "attn1.to_out.0": "self_attn.o",
            "attn2.to_q": "cross_attn.q",
            "attn2.to_k": "cross_attn.k",
            "attn2.to_v": "cross_attn.v",
            "attn2.to_out.0": "cross_attn.o",
            "attn2.add_k_proj": "cross_attn.k_img",  # image-to-video models
            "attn2.add_v_proj": "cross_attn.v_img",
            "ffn.net.0.proj": "ffn.0",
            "ffn.net.2": "ffn.2",
        },
        source="Wan-Video/Wan2.1: wan/modules/model.py (ComfyUI: comfy/ldm/wan/model.py)",
    ),
    ("comfy", "cogvideox"): Layout(
        family="cogvideox",
        blocks="transformer_blocks",
        target_blocks="diffusion_model.blocks",
        modules={
            "attn1.to_q": "q",
            "attn1.to_k": "k",
            "attn1.to_v": "v",
            "attn1.to_out.0": "attn_out",
            "ff.net.0.proj": "ff_proj",
            "ff.net.2": "ff_out",
        },
        source="Comfy-Org/ComfyUI: comfy/ldm/cogvideo/model.py",
    ),
}
FORMATS = tuple(dict.fromkeys(fmt for fmt, _ in LAYOUTS))

_LORA_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.weight")


def export_lora(run_dir: str | os.PathLike, fmt: str = "comfy", out: str | os.PathLike | None = None) -> Path:
    """Write a stage-2 LoRA run's RUN/pytorch_lora_weights.safetensors in another key layout.

    Args:
        run_dir: a stage-2 run folder: RUN/config.json (`config.backbone` names the family) and
            RUN/pytorch_lora_weights.safetensors (a LoRA run; a full fine-tune has RUN/transformer/ instead).
        fmt: the target layout, one of `FORMATS` ("comfy": ComfyUI's native Wan2.1 / CogVideoX names).
        out: the file to write (a name ending in .safetensors); any other path is a folder (created when
            missing) that gets the default file name; None (the default):
            RUN/<fmt>/<run folder name>_<fmt>_lora.safetensors.

    Returns:
        The file written (atomically). Per module it holds lora_down (r, in), lora_up (out, r) and a 0-dim
        alpha, with lora_up @ lora_down * alpha / r equal to the run's weight delta; its metadata holds
        format, family, rank, alpha and the layout's source.
    """
    if fmt not in FORMATS:
        raise MoalignError(f"unknown LoRA export format {fmt!r}; formats: {', '.join(FORMATS)} ({_pairs()})")
    run_dir = Path(run_dir)
    src = run_dir / LORA_FILE
    config = _run_config(run_dir)
    if not src.is_file():
        if (run_dir / "transformer").is_dir() or config.get("lora_rank") == 0:
            raise MoalignError(
                f"{run_dir} is a full fine-tune (RUN/transformer/, lora_rank 0), not a LoRA run: it has no "
                f"{LORA_FILE} to export. Load RUN/transformer with from_pretrained, or train with "
                "--lora-rank R for a LoRA."
            )
        raise MoalignError(f"{run_dir} has no {LORA_FILE}: not a stage-2 LoRA run folder")
    family = config["backbone"]
    layout = LAYOUTS.get((fmt, family))
    if layout is None:
        raise MoalignError(
            f"{run_dir / 'config.json'}: backbone {family!r} has no {fmt!r} LoRA layout ({_pairs()})"
        )

    from safetensors import safe_open

    try:
        with safe_open(str(src), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # a truncated or foreign file
        raise MoalignError(f"cannot read {src} as safetensors ({e}); re-save the LoRA from the run") from None
    alpha = _adapter_alpha(metadata, config, src)
    tensors, ranks = convert_lora(state, layout, alpha, where=src)

    name = f"{run_dir.resolve().name}_{fmt}_lora.safetensors"
    out = run_dir / fmt / name if out is None else _output(out, name)
    rank = ",".join(str(r) for r in sorted(ranks))
    save_safetensors(
        out,
        tensors,
        metadata={
            "format": fmt,
            "family": family,
            "rank": rank,
            "alpha": rank if alpha is None else f"{alpha:g}",
            "modules": str(len(tensors) // 3),
            "layout": layout.source,
            "exported_from": LORA_FILE,
            "moalign_version": __version__,
        },
    )
    return out


def convert_lora(
    state: dict[str, torch.Tensor], layout: Layout, alpha: float | None, where: Path | str = ""
) -> tuple[dict[str, torch.Tensor], set[int]]:
    """diffusers LoRA tensors (transformer.<module>.lora_A / lora_B.weight) -> the layout's lora_down, lora_up
    and alpha per module.

    Args:
        alpha: the adapter's lora_alpha; None: each module's rank (scale 1, as diffusers assumes for a file
            without metadata).

    Returns:
        (tensors, the set of ranks found).
    """
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(state):
        m = _LORA_KEY.fullmatch(key)
        target = layout.target(m[1]) if m else None
        if target is None:
            raise MoalignError(
                f"{where}: LoRA key {key!r} has no counterpart in the {layout.family} layout "
                f"({layout.source}), which takes lora_A/lora_B weights of these modules of each "
                f"{layout.blocks}.N: {', '.join(layout.modules)}. Supported layouts: {_pairs()}."
            )
        factors.setdefault(target, {})[m[2]] = state[key]

    tensors: dict[str, torch.Tensor] = {}
    ranks: set[int] = set()
    for target, ab in factors.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise MoalignError(f"{where}: {target} has no {missing} weight; re-save the LoRA from the run")
        down, up = ab["A"], ab["B"]  # (r, in), (out, r)
        rank = down.shape[0]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != rank:
            raise MoalignError(
                f"{where}: {target}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} "
                "are not (r, in) and (out, r)"
            )
        tensors[f"{target}.lora_down.weight"] = down
        tensors[f"{target}.lora_up.weight"] = up
        tensors[f"{target}.alpha"] = torch.tensor(
            float(rank if alpha is None else alpha), dtype=torch.float32
        )
        ranks.add(rank)
    return tensors, ranks


def _pairs() -> str:
    return "format/backbone: " + ", ".join(f"{fmt}/{family}" for fmt, family in LAYOUTS)


def _run_config(run_dir: Path) -> dict[str, Any]:
    """RUN/config.json's resolved config (`moalign.run.checkpoint.write_run_config`)."""
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise MoalignError(
            f"{run_dir} is not a folder: pass a stage-2 run folder (the --out of moalign stage2)"
        )
    if not path.is_file():
        raise MoalignError(f"{run_dir} has no config.json: not a moalign stage-2 run folder")
    try:
        config = json.loads(path.read_text()).get("config")
    except (json.JSONDecodeError, AttributeError) as e:
        raise MoalignError(f"{path} is not a moalign run config ({e})") from None
    if not isinstance(config, dict) or "backbone" not in config:
        raise MoalignError(f"{path} has no config.backbone: not a stage-2 run config")
    return config


def _adapter_alpha(metadata: dict[str, str], config: dict[str, Any], src: Path) -> float | None:
    """The adapter's lora_alpha: the file's metadata (what the diffusers pipeline applies), else
    RUN/config.json (lora_alpha, or lora_rank when that is null); None when neither says."""
    meta: dict[str, Any] = {}
    if "lora_adapter_metadata" in metadata:
        try:
            meta = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError:
            raise MoalignError(
                f"{src}: unreadable lora_adapter_metadata; re-save the LoRA from the run"
            ) from None
    for flag, what in (
        ("use_dora", "DoRA"),
        ("use_rslora", "rsLoRA (alpha / sqrt(r))"),
        ("alpha_pattern", ""),
    ):
        if meta.get(f"transformer.{flag}"):
            raise MoalignError(
                f"{src}: {what or 'per-module alphas (alpha_pattern)'} cannot be exported; "
                "the export takes plain LoRA with one alpha (moalign.run.lora.add_lora)"
            )
    file_alpha = meta.get("transformer.lora_alpha")
    run_alpha = config.get("lora_alpha") or config.get("lora_rank") or None
    if file_alpha is not None and run_alpha is not None and float(file_alpha) != float(run_alpha):
        raise MoalignError(
            f"{src} says lora_alpha={file_alpha} but {src.parent / 'config.json'} says {run_alpha}: "
            "the LoRA file does not belong to this run's config"
        )
    alpha = file_alpha if file_alpha is not None else run_alpha
    return None if alpha is None else float(alpha)


def _output(out: str | os.PathLike, name: str) -> Path:
    """The file `--out` names: itself when it ends in .safetensors, else NAME inside it as a folder (a ComfyUI
    loras folder that does not exist yet, or `exp/`, is a folder, not a file named like it)."""
    path = Path(out)
    if path.suffix.lower() == ".safetensors" and not path.is_dir():
        if path.parent.exists() and not path.parent.is_dir():
            raise MoalignError(f"--out {out}: {path.parent} is a file, not a folder. Choose another --out.")
        return path
    if path.exists() and not path.is_dir():
        raise MoalignError(
            f"--out {out} is an existing file without the .safetensors suffix: name the file NAME.safetensors, or "
            "pass a folder"
        )
    return path / name

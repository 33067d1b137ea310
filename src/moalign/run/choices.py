"""The names the command line offers as choices, without importing torch (so `moalign --help` is instant).

Each tuple mirrors a registry of the package; tests/test_cli.py asserts they are equal, so a new align mode,
backbone, flow method, preset or dtype is added in both places or the suite fails.
"""

from __future__ import annotations

ALIGN_MODES = ("none", "repa", "trd", "raw-moalign", "motion-trd", "moalign")  # moalign.alignment.ALIGN_MODES
BACKBONES = ("cogvideox", "wan")  # moalign.backbones.BACKBONES
FLOW_METHODS = ("dis", "farneback", "raft", "exact")  # moalign.data.flow.FLOW_METHODS
MOTIONS = ("bounce", "throw", "roll", "collide", "static")  # moalign.playground.scenes.MOTIONS
PRESETS = (
    "tiny",
    "small",
    "cogvideox-2b",
    "cogvideox-5b",
    "wan2.1-1.3b",
    "wan2.1-14b",
)  # moalign.presets.PRESETS
DTYPES = ("float32", "bfloat16", "float16")  # moalign.backbones.spec.DTYPES
RECIPE_PARTS = (
    "synth",
    "pretrain",
    "stage1",
    "stage2",
    "demo",
    "generate",
    "study",
)  # fields of presets.Recipe
MIXED_PRECISION = ("no", "fp16", "bf16")  # accelerate's
REPORT_TO = ("none", "tensorboard", "wandb", "all")  # moalign.run.training.REPORT_TO

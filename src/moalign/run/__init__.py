"""Run plumbing shared by every stage: launch, training loop helpers, checkpoints, atomic writes, LoRA files,
model cards, plots, config serialization. Nothing here is part of the method.
"""

"""Feature capture: forward hooks on chosen blocks of a video transformer, in one small context manager.

    with FeatureCapture(blocks, indices=(17,), select=spec.video_tokens) as cap:
        model(...)                      # the hooked blocks write their video tokens into cap
        tokens = cap[17]                # (B, N, D), still attached to the graph
    # every hook is removed here, also when the forward raised

Indices are 0-based positions in the block list (the paper's "layer 18" of CogVideoX-2B is index 17).
Each hook overwrites its slot rather than appending: under gradient checkpointing a block runs again in
the backward pass, and that recomputation must not add a second entry. `clear()` empties the slots
between steps. The captured tensors keep their autograd graph (the alignment gradient flows into the
transformer through them; with non-reentrant checkpointing too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def _identity(output: Any) -> torch.Tensor:
    return output


class FeatureCapture:
    """Context manager holding the outputs of chosen blocks.

    Args:
        blocks: the transformer's block list (e.g. `transformer.transformer_blocks`).
        indices: 0-based block indices; negative indices count from the end.
        select: maps a block's raw output to the video tokens (B, N, D), e.g. `lambda out: out[0]` for
            CogVideoX blocks, which return (video tokens, text tokens).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        indices: Sequence[int],
        select: Callable[[Any], torch.Tensor] = _identity,
    ):
        n = len(blocks)
        resolved = []
        for i in indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(f"block index {i} is out of range: the model has {n} blocks (0..{n - 1})")
            resolved.append(j)
        self.blocks = blocks
        self.indices = tuple(resolved)
        self.select = select
        self.features: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.features[index] = self.select(output)  # overwrite: recomputation must not append

        return hook

    def __enter__(self) -> FeatureCapture:
        if self._handles:
            raise RuntimeError("FeatureCapture is already active; use one `with` block at a time")
        for i in self.indices:
            self._handles.append(self.blocks[i].register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Drop the captured tensors (call once per step)."""
        self.features.clear()

    def __getitem__(self, index: int) -> torch.Tensor:
        j = index + len(self.blocks) if index < 0 else index
        if j not in self.features:
            raise KeyError(
                f"block {index} was not captured (hooked: {list(self.indices)}); run the forward first"
            )
        return self.features[j]

    @property
    def active(self) -> bool:
        return bool(self._handles)

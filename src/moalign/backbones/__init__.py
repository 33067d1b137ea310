"""Backbone families: one spec per family, registered by a readable key."""

from __future__ import annotations

from collections.abc import Callable

from moalign.backbones.cogvideox import CogVideoXSpec
from moalign.backbones.spec import BackboneSpec, frame_major
from moalign.backbones.wan import WanSpec

BACKBONES: dict[str, Callable[[], BackboneSpec]] = {
    "cogvideox": CogVideoXSpec,
    "wan": WanSpec,
}


def get_backbone(name: str) -> BackboneSpec:
    """The spec of a family; an unknown name raises an error listing the valid ones."""
    try:
        return BACKBONES[name]()
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}") from None


__all__ = ["BACKBONES", "BackboneSpec", "CogVideoXSpec", "WanSpec", "frame_major", "get_backbone"]

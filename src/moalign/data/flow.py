"""Optical flow targets for stage 1: what the flow decoder F_omega learns (arXiv 2510.19022, Sec. 3.1).

Convention everywhere: forward flow between consecutive frames, in pixels of the frame it is computed on,
channel 0 = x (right), channel 1 = y (down), such that ``a(p) ~ b(p + flow(p))`` for the pair (a, b).
This is OpenCV's and torchvision RAFT's convention.

Backends (`FLOW_METHODS`), one interface:

- ``dis``: OpenCV DIS (dense inverse search) on grayscale, preset MEDIUM. Deterministic, the CPU default.
- ``farneback``: OpenCV Farneback polynomial expansion. Slower and smoother than DIS.
- ``raft``: torchvision RAFT (the paper's choice), weights from a local file; GPU machines only.
- ``exact``: the synthetic playground's ground-truth flow, read from the dataset item.

The flow cache (`moalign/data/flow_cache.py`) stores a backend's flow for a whole dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from moalign.data.cache import file_digest
from moalign.errors import MoalignError, one_line


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(
            f"pair() takes two uint8 (H, W, 3) frames, got {a.dtype} {a.shape} and {b.dtype} {b.shape}"
        )


def _frames_numpy(frames: Any) -> np.ndarray:
    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] < 2:
        raise ValueError(f"flow needs at least 2 frames, got {frames.shape[0]}")
    return frames


class FlowEstimator:
    """Base class: forward flow between consecutive frames, in pixels, x then y.

    Subclasses implement `pair` (or override `video` to batch). `config` is what goes into a cache's
    fingerprint, so it must hold every option that changes the output.
    """

    name: str = "base"

    def config(self) -> dict[str, Any]:
        """JSON-able description of the method and every option that changes its output."""
        return {"method": self.name}

    def pair(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Flow from frame a to frame b.

        Args:
            a, b: uint8 (H, W, 3) RGB frames.

        Returns:
            float32 (H, W, 2) flow in pixels (x, y) with ``a(p) ~ b(p + flow(p))``.
        """
        raise NotImplementedError

    def video(self, frames: np.ndarray) -> np.ndarray:
        """Flow of every consecutive pair: uint8 (T, H, W, 3) -> float32 (T-1, H, W, 2)."""
        frames = _frames_numpy(frames)
        return np.stack([self.pair(frames[t], frames[t + 1]) for t in range(len(frames) - 1)])

    def estimate(self, sample: dict) -> torch.Tensor:
        """Flow of one dataset item (``sample["frames"]``: uint8 (T, H, W, 3)) -> float32 (T-1, H, W, 2)."""
        return torch.from_numpy(np.ascontiguousarray(self.video(_frames_numpy(sample["frames"]))))

    def extras(self, sample: dict) -> dict[str, torch.Tensor]:
        """Extra tensors stored beside "flow" in a cache (e.g. a validity mask); none by default."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({opts})"


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


class DISFlow(FlowEstimator):
    """OpenCV DIS optical flow on grayscale frames (Kroeger et al., ECCV 2016); deterministic, CPU.

    Args:
        preset: "ultrafast", "fast" or "medium" (OpenCV's DISOPTICAL_FLOW_PRESET_*).
        finest_scale, patch_size, patch_stride, gradient_descent_iterations, variational_refinement_iterations:
            override the preset's value when given.
    """

    name = "dis"
    PRESETS = {
        "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
        "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
        "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
    }
    MIN_SIZE = 12  # OpenCV refuses frames with both sides below this

    def __init__(
        self,
        preset: str = "medium",
        finest_scale: int | None = None,
        patch_size: int | None = None,
        patch_stride: int | None = None,
        gradient_descent_iterations: int | None = None,
        variational_refinement_iterations: int | None = None,
    ) -> None:
        if preset not in self.PRESETS:
            raise ValueError(f"unknown DIS preset {preset!r}; valid presets: {', '.join(self.PRESETS)}")
        self.preset = preset
        dis = cv2.DISOpticalFlow_create(self.PRESETS[preset])
        requested = {
            "FinestScale": finest_scale,
            "PatchSize": patch_size,
            "PatchStride": patch_stride,
            "GradientDescentIterations": gradient_descent_iterations,
            "VariationalRefinementIterations": variational_refinement_iterations,
        }
        # the effective values, not just the preset name: they pin the output (and the cache fingerprint)
        self.params = {
            k: int(v) if v is not None else getattr(dis, f"get{k}")() for k, v in requested.items()
        }

    def _make(self) -> Any:
        # A fresh object per pair: OpenCV's DIS lowers its finest scale for small frames and keeps it, so a
        # reused object would make a clip's flow depend on which clips came before (and break resume equality).
        dis = cv2.DISOpticalFlow_create(self.PRESETS[self.preset])
        for attr, value in self.params.items():
            getattr(dis, f"set{attr}")(value)
        return dis

    def config(self) -> dict[str, Any]:
        p = self.params
        return {
            "method": self.name,
            "preset": self.preset,
            "finest_scale": p["FinestScale"],
            "patch_size": p["PatchSize"],
            "patch_stride": p["PatchStride"],
            "gradient_descent_iterations": p["GradientDescentIterations"],
            "variational_refinement_iterations": p["VariationalRefinementIterations"],
            "opencv": cv2.__version__,
        }

    def pair(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        _check_pair(a, b)
        if max(a.shape[:2]) < self.MIN_SIZE:
            raise ValueError(
                f"DIS flow needs frames at least {self.MIN_SIZE} px on one side, got {a.shape[0]}x{a.shape[1]}. "
                "Use a larger --height/--width."
            )
        return self._make().calc(_gray(a), _gray(b), None).astype(np.float32, copy=False)


class FarnebackFlow(FlowEstimator):
    """OpenCV Farneback dense flow on grayscale frames (Farneback, SCIA 2003); deterministic, CPU.

    Args: OpenCV's parameters of ``calcOpticalFlowFarneback``; defaults are a common choice for small
    frames (3-level pyramid, 15 px window, Gaussian window for smoother, more accurate flow).
    """

    name = "farneback"

    def __init__(
        self,
        pyr_scale: float = 0.5,
        levels: int = 3,
        winsize: int = 15,
        iterations: int = 3,
        poly_n: int = 5,
        poly_sigma: float = 1.2,
        gaussian_window: bool = True,
    ) -> None:
        self.params = {
            "pyr_scale": float(pyr_scale),
            "levels": int(levels),
            "winsize": int(winsize),
            "iterations": int(iterations),
            "poly_n": int(poly_n),
            "poly_sigma": float(poly_sigma),
            "gaussian_window": bool(gaussian_window),
        }

    def config(self) -> dict[str, Any]:
        return {"method": self.name, **self.params, "opencv": cv2.__version__}

    def pair(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        _check_pair(a, b)
        p = self.params
        flags = cv2.OPTFLOW_FARNEBACK_GAUSSIAN if p["gaussian_window"] else 0
        flow = cv2.calcOpticalFlowFarneback(
            _gray(a),
            _gray(b),
            None,
            p["pyr_scale"],
            p["levels"],
            p["winsize"],
            p["iterations"],
            p["poly_n"],
            p["poly_sigma"],
            flags,
        )
        return flow.astype(np.float32, copy=False)


class RAFTFlow(FlowEstimator):
    """torchvision RAFT (Teed and Deng, ECCV 2020), the paper's flow source; needs torchvision (GPU machines).

    Args:
        weights: local file with the torchvision RAFT state dict (``.pth`` or ``.safetensors``), e.g.
            torchvision's ``raft_large_C_T_SKHT_V2-ff5fadd5.pth``. Nothing is downloaded.
        model: "large" (``raft_large``) or "small" (``raft_small``), matching the weights.
        device: torch device to run on.
        iters: recurrent refinement steps (torchvision default 12).
        batch_size: frame pairs per forward pass.

    Frames are scaled to [-1, 1], padded (replicate) to multiples of 8 as RAFT needs, and the flow is
    cropped back to the input size.
    """

    name = "raft"
    MODELS = ("large", "small")

    def __init__(
        self,
        weights: str | os.PathLike | None,
        model: str = "large",
        device: str = "cpu",
        iters: int = 12,
        batch_size: int = 8,
    ) -> None:
        if model not in self.MODELS:
            raise ValueError(f"unknown RAFT model {model!r}; valid: {', '.join(self.MODELS)}")
        if weights is None:
            raise MoalignError(
                "RAFT flow needs a local weights file: pass --raft-weights PATH (torchvision's "
                "raft_large_C_T_SKHT_V2-ff5fadd5.pth or raft_small_C_T_V2-01064c6d.pth), or use --method dis."
            )
        weights = Path(weights)
        if not weights.is_file():
            raise MoalignError(
                f"RAFT weights file not found: {weights}. Copy the torchvision RAFT checkpoint there "
                "(nothing is downloaded at run time), or use --method dis."
            )
        try:
            from torchvision.models import optical_flow
        except Exception as err:  # missing, or installed but broken (as on CPU-only machines)
            raise MoalignError(
                f"RAFT flow needs a working torchvision (import failed: {type(err).__name__}: {err}). "
                "Use it on a GPU machine with torchvision installed, or use --method dis "
                "(never install torchvision on a CPU machine: it breaks diffusers and transformers imports)."
            ) from err
        net = (
            optical_flow.raft_large(weights=None)
            if model == "large"
            else optical_flow.raft_small(weights=None)
        )
        state = _load_state_dict(weights)
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            other = "small" if model == "large" else "large"
            raise MoalignError(
                f"{weights} does not hold torchvision raft_{model} weights ({one_line(err)}). "
                f"Check the file, or pass the raft model option {other!r} if these are raft_{other} weights."
            ) from err
        self.model_name: str = model
        self.weights_file: Path | None = weights
        self.iters, self.batch_size = int(iters), int(batch_size)
        self.device = torch.device(device)
        self.net = net.eval().requires_grad_(False).to(self.device)

    @classmethod
    def from_module(
        cls, net: torch.nn.Module, device: str = "cpu", iters: int = 12, batch_size: int = 8
    ) -> RAFTFlow:
        """Wrap an already built RAFT-like module (``net(img1, img2, num_flow_updates=k) -> [flows]``)."""
        self = cls.__new__(cls)
        self.model_name, self.weights_file = "custom", None
        self.iters, self.batch_size = int(iters), int(batch_size)
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        return self

    def config(self) -> dict[str, Any]:
        digest = file_digest(self.weights_file) if self.weights_file is not None else None
        return {"method": self.name, "model": self.model_name, "weights_sha256": digest, "iters": self.iters}

    @torch.inference_mode()
    def _flows(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) x2 -> float32 (B, H, W, 2) on CPU."""
        h, w = a.shape[1:3]
        ph, pw = -h % 8, -w % 8
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom

        def prep(x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
            return torch.nn.functional.pad(x, pad, mode="replicate") if ph or pw else x

        flow = self.net(prep(a), prep(b), num_flow_updates=self.iters)[-1]  # (B, 2, H+ph, W+pw)
        flow = flow[:, :, pad[2] : pad[2] + h, pad[0] : pad[0] + w]
        return flow.permute(0, 2, 3, 1).float().cpu()

    def pair(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        _check_pair(a, b)
        return self._flows(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].numpy()

    def video(self, frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(_frames_numpy(frames))
        out = [
            self._flows(x[i : i + self.batch_size], x[i + 1 : i + 1 + self.batch_size])
            for i in range(0, len(x) - 1, self.batch_size)
        ]
        return torch.cat(out).numpy()


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MoalignError(
            f"cannot read RAFT weights {path}: {one_line(err)}. Pass a torchvision RAFT state dict "
            "(.pth or .safetensors)."
        ) from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


class ExactFlow(FlowEstimator):
    """The synthetic playground's exact flow: returns ``sample["flow"]`` (and stores ``"valid"`` beside it)."""

    name = "exact"

    def _missing(self) -> MoalignError:
        return MoalignError(
            "flow method 'exact' reads the dataset's ground-truth flow, but this dataset has no ground-truth "
            "flow column (only the synthetic playground provides one). Use --method dis."
        )

    def pair(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        raise self._missing()

    def estimate(self, sample: dict) -> torch.Tensor:
        if sample.get("flow") is None:
            raise self._missing()
        return torch.as_tensor(sample["flow"], dtype=torch.float32)

    def extras(self, sample: dict) -> dict[str, torch.Tensor]:
        valid = sample.get("flow_valid")
        return {} if valid is None else {"valid": torch.as_tensor(valid, dtype=torch.bool)}


FLOW_METHODS: dict[str, type[FlowEstimator]] = {
    "dis": DISFlow,
    "farneback": FarnebackFlow,
    "raft": RAFTFlow,
    "exact": ExactFlow,
}


def build_flow_estimator(
    method: str, *, raft_weights: str | os.PathLike | None = None, device: str = "cpu", **options: Any
) -> FlowEstimator:
    """Build a flow backend by name.

    Args:
        method: a key of `FLOW_METHODS`: "dis" (CPU default), "farneback", "raft", "exact".
        raft_weights: local RAFT weights file (method "raft" only; ignored otherwise).
        device: torch device (method "raft" only; the OpenCV backends run on CPU).
        **options: backend options, e.g. ``preset="fast"`` for dis, ``model="small"`` for raft.

    Returns:
        The estimator.

    Raises:
        MoalignError: unknown method (the message lists the valid ones), or a backend that cannot start
            (RAFT: no weights file, an unreadable one, or no working torchvision).
        ValueError: an unknown backend option value (DIS preset, RAFT model).
    """
    if method not in FLOW_METHODS:
        raise MoalignError(f"unknown flow method {method!r}; valid methods: {', '.join(FLOW_METHODS)}")
    if method == "raft":
        return RAFTFlow(raft_weights, device=device, **options)
    return FLOW_METHODS[method](**options)

"""Linear probes: how much of a target a set of token features holds, measured on held-out clips.

A probe is ridge regression in closed form on standardised features (fitted on one half of the clips, scored
on the other), as representation-learning papers probe frozen features. Classification uses the same ridge fit
on one-hot targets and the arg-max (a least-squares linear classifier).

`stage1_disentanglement` is the paper's claim made measurable (Sec. 3.1: the motion subspace keeps motion and
drops appearance): on the playground, where colour and motion are drawn independently, probes from the raw
encoder tokens and from the motion-subspace tokens to the token-level flow (held-out R^2) and to the colour of
the ball a token shows (held-out accuracy, against the majority-class rate). Whichever way it comes out, it is
reported as measured.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def ridge_predict(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, alpha: float = 1.0
) -> np.ndarray:
    """Fit ridge regression on (x_train (N, D), y_train (N, K)) with standardised features and a free bias;
    return its predictions for x_test (M, D) -> (M, K). float64 throughout."""
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    y_train = np.asarray(y_train, np.float64).reshape(len(x_train), -1)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    a, b = (x_train - mean) / std, (x_test - mean) / std
    y_mean = y_train.mean(0)
    weights = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ (y_train - y_mean))
    return b @ weights + y_mean


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination pooled over outputs: 1 - sum (y - y_hat)^2 / sum (y - mean(y))^2.

    NaN (null in the JSON files) when y has no variance (e.g. held-out clips without motion): R^2 is undefined
    there, and dividing by a tiny floor would report a huge negative number instead."""
    y_true = np.asarray(y_true, np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, np.float64).reshape(len(y_true), -1)
    total = np.square(y_true - y_true.mean(0)).sum()
    if total <= 1e-12 * max(1, y_true.size):
        return float("nan")
    return float(1.0 - np.square(y_true - y_pred).sum() / total)


def probe_r2(x: np.ndarray, y: np.ndarray, train: np.ndarray, alpha: float = 1.0) -> float:
    """Held-out R^2 of a ridge probe from x (N, D) to y (N, K); `train` (N,) bool marks the fitting rows."""
    return r2_score(y[~train], ridge_predict(x[train], y[train], x[~train], alpha))


def probe_accuracy(
    x: np.ndarray, labels: np.ndarray, train: np.ndarray, alpha: float = 1.0
) -> tuple[float, float]:
    """(held-out accuracy, majority-class rate of the held-out rows) of a ridge classifier on one-hot labels."""
    classes = np.unique(labels[train])
    onehot = (labels[train][:, None] == classes[None]).astype(np.float64)
    pred = classes[ridge_predict(x[train], onehot, x[~train], alpha).argmax(1)]
    test = labels[~train]
    majority = float(np.bincount(np.searchsorted(classes, test[np.isin(test, classes)])).max() / len(test))
    return float((pred == test).mean()), majority


def token_targets(
    frames: np.ndarray, flow: torch.Tensor, grid: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per token of a (F'', H'', W'') grid over a 4k+1-frame clip whose first frame the encoder drops: the mean
    flow of its two frame pairs over its patch (F''*H''*W'', 2), and the palette colour index of the ball
    covering most of its patch in its frames (-1: background; `moalign/playground/tracking.py`'s rule)."""
    from moalign.data.geometry import resize_flow
    from moalign.playground.captions import COLOURS
    from moalign.playground.tracking import _colour_labels

    f, h, w = grid
    token_flow = resize_flow(flow.float(), h, w).reshape(f, -1, h, w, 2).mean(1)  # tubelet j: pairs 2j, 2j+1
    labels = _colour_labels(frames[1:])[0].reshape(f, -1, *frames.shape[1:3])  # (F'', 2, H, W)
    rows = np.linspace(0, frames.shape[1], h + 1).astype(int)
    cols = np.linspace(0, frames.shape[2], w + 1).astype(int)
    onehot = np.eye(len(COLOURS) + 1, dtype=np.int64)[labels.astype(np.int64) + 1].sum(
        1
    )  # (F'', H, W, 1 + C)
    votes = np.add.reduceat(
        np.add.reduceat(onehot, rows[:-1], axis=1), cols[:-1], axis=2
    )  # (F'', H'', W', 1+C)
    pixels = 2 * np.diff(rows)[:, None] * np.diff(cols)[None, :]  # per token: its patch over its two frames
    best = votes.argmax(-1)
    majority = np.take_along_axis(votes, best[..., None], -1)[..., 0] * 2 > pixels
    colour = np.where(majority & (best > 0), best - 1, -1)  # index 0 of the votes is the background
    return token_flow.reshape(-1, 2).numpy(), colour.reshape(-1)


def stage1_disentanglement(clips: list[dict[str, Any]], alpha: float = 1.0) -> dict[str, Any]:
    """Probes from raw encoder tokens and motion tokens to token flow and ball colour, split by clip.

    Args:
        clips: per clip "encoder" (F'', H'', W'', D_v) and "motion" (F'', H'', W'', D_m) tokens, "frames" uint8
            (T, H, W, 3) and "flow" (T-1, H, W, 2) at the dataset resolution.

    Returns:
        flow_r2 and colour_accuracy per feature space, the colour chance level, and the counts.
    """
    feats: dict[str, list[np.ndarray]] = {"encoder": [], "motion": []}
    flows, colours, clip_of = [], [], []
    for n, clip in enumerate(clips):
        grid = tuple(clip["encoder"].shape[:3])
        flow, colour = token_targets(clip["frames"], clip["flow"], grid)
        for space in feats:
            feats[space].append(clip[space].reshape(-1, clip[space].shape[-1]).float().cpu().numpy())
        flows.append(flow)
        colours.append(colour)
        clip_of.append(np.full(len(flow), n))
    clip_of, flow, colour = np.concatenate(clip_of), np.concatenate(flows), np.concatenate(colours)
    train = clip_of % 2 == 0  # even clips fit, odd clips score
    ball = colour >= 0
    out: dict[str, Any] = {"clips": len(clips), "tokens": int(len(flow)), "ball_tokens": int(ball.sum())}
    out["flow_r2"] = {s: probe_r2(np.concatenate(f), flow, train, alpha) for s, f in feats.items()}
    usable = ball & np.isin(colour, np.unique(colour[ball & train]))
    if (usable & train).any() and (usable & ~train).any():
        accuracy = {
            s: probe_accuracy(np.concatenate(f)[usable], colour[usable], train[usable], alpha)
            for s, f in feats.items()
        }
        out["colour_accuracy"] = {s: a for s, (a, _) in accuracy.items()}
        out["colour_chance"] = next(iter(accuracy.values()))[1]
    return out

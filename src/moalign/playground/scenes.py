"""Scenes of the playground: what `moalign synth` draws per clip (kind, balls, colours, background).

No model weights or data sets can be downloaded where the product is developed, so the playground is the
embedded default data source for every stage. Everything is numpy; a clip is a pure function of
``(cfg.seed, index)``, so clip ``i`` is the same whatever ``num_clips`` is.

Scene kinds (`MOTIONS`)
    ``bounce``: 1..max_balls balls dropped from rest at different heights in separate columns.
    ``throw``: one ball thrown from one side towards the other (projectile); it may reach the far wall.
    ``roll``: one ball moves along the floor and slows down with friction; it may reach the far wall.
    (Balls never rotate: "rolls" is what the caption calls a ball moving on the floor.)
    ``collide``: two balls thrown towards each other that meet in the air (guaranteed: under the same
    gravity their relative motion is a straight line, aimed to pass closer than the sum of the radii).
    ``static``: 1..max_balls balls resting on the floor (a control: frames identical, flow exactly 0).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from moalign.playground.captions import COLOURS, _caption, _side
from moalign.playground.physics import _DECIMALS, Ball, Physics, run_physics

_WALL_RGB = np.array([0.33, 0.34, 0.37])

_FLOOR_RGB = np.array([0.25, 0.21, 0.18])


MOTIONS: tuple[str, ...] = ("bounce", "throw", "roll", "collide", "static")


@dataclass(frozen=True)
class SynthConfig:
    """What `write_playground` generates. Physics fields left at None scale with the image size.

    Units are pixels and frames. Auto values (the 64x64 reference scaled by height/64 for vertical
    quantities, width/64 for horizontal ones, min(H, W)/64 for radii) are filled in by `resolved()`.
    To JSON and back, and ``--set motions=bounce,throw`` overrides: `moalign.run.serialize`.
    """

    num_clips: int = 64
    seed: int = 0
    num_frames: int = 17  # 4k+1, like the video VAEs want
    height: int = 64  # divisible by 16
    width: int = 64  # divisible by 16
    fps: float = 8.0  # stored in the mp4; the physics runs in frames, not seconds
    motions: tuple[str, ...] = MOTIONS  # scene kinds drawn per clip
    motion_weights: tuple[float, ...] | None = None  # relative weights of `motions`; None: uniform
    max_balls: int = 3
    background: str = "textured"  # "plain" or "textured" (a static procedural texture)
    crf: int = 12  # x264 quality of the mp4 files (0 = lossless)
    gravity: float | None = None  # px/frame^2 downwards; None: 1.5 * height / 64
    restitution: tuple[float, float] = (0.6, 0.85)  # e drawn per clip, floor, walls and ball-ball alike
    friction: tuple[float, float] | None = None  # rolling deceleration px/frame^2; None: (0.08, 0.16) * W/64
    radius: tuple[float, float] | None = None  # ball radius px; None: (4, 7) * min(H, W)/64, at least 3
    launch_speed: tuple[float, float] | None = None  # horizontal px/frame; None: (2, 4) * width/64
    floor_height: int | None = None  # rows of floor band; None: max(4, height // 8)
    substeps: int = 16  # integration substeps per frame interval
    min_bounce_frames: float = 2.0  # rebounds shorter than this (in frames) land the ball instead

    def __post_init__(self) -> None:
        if self.num_frames < 5 or (self.num_frames - 1) % 4 != 0:
            k = max(1, round((self.num_frames - 1) / 4))
            raise ValueError(
                f"num_frames must be 4k+1 with k >= 1 (video VAEs need it), got {self.num_frames}; "
                f"use e.g. {4 * k + 1} (or 9, 17, 33, 49)"
            )
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 32 or value % 16 != 0:
                raise ValueError(
                    f"{name} must be a multiple of 16 and at least 32, got {value}; "
                    f"use e.g. {max(32, 16 * round(value / 16))}"
                )
        if self.num_clips < 0:
            raise ValueError(f"num_clips must be >= 0, got {self.num_clips}")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if not self.motions:
            raise ValueError(f"motions must name at least one scene kind of {', '.join(MOTIONS)}")
        bad = [m for m in self.motions if m not in MOTIONS]
        if bad:
            raise ValueError(f"unknown motion kind(s) {bad}; valid kinds: {', '.join(MOTIONS)}")
        if self.motion_weights is not None:
            if len(self.motion_weights) != len(self.motions) or min(self.motion_weights) < 0:
                raise ValueError(
                    f"motion_weights must give one weight >= 0 per motion ({len(self.motions)}), "
                    f"got {self.motion_weights}"
                )
            if sum(self.motion_weights) <= 0:
                raise ValueError("motion_weights must not all be zero")
        if not 1 <= self.max_balls <= len(COLOURS):
            raise ValueError(
                f"max_balls must be in 1..{len(COLOURS)} (one colour per ball), got {self.max_balls}"
            )
        if "collide" in self.motions and self.max_balls < 2:
            raise ValueError(
                "'collide' scenes need two balls: set max_balls >= 2 or drop 'collide' from motions"
            )
        if self.background not in ("plain", "textured"):
            raise ValueError(f"background must be 'plain' or 'textured', got {self.background!r}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in 0..51 (x264), got {self.crf}")
        if self.gravity is not None and self.gravity <= 0:
            raise ValueError(f"gravity must be > 0 px/frame^2 (or None for auto), got {self.gravity}")
        for name, lo_bound in (
            ("restitution", 0.0),
            ("friction", 0.0),
            ("radius", 1.0),
            ("launch_speed", 0.0),
        ):
            rng = getattr(self, name)
            if rng is not None and (len(rng) != 2 or rng[0] > rng[1] or rng[0] < lo_bound):
                raise ValueError(
                    f"{name} must be a (low, high) range with {lo_bound} <= low <= high, got {rng}"
                )
        if self.restitution[1] > 1.0:
            raise ValueError(f"restitution must be <= 1 (no energy gain), got {self.restitution}")
        if self.floor_height is not None and not 1 <= self.floor_height <= self.height // 3:
            raise ValueError(f"floor_height must be in 1..height/3, got {self.floor_height}")
        if self.substeps < 1:
            raise ValueError(f"substeps must be >= 1, got {self.substeps}")
        if self.min_bounce_frames < 0:
            raise ValueError(f"min_bounce_frames must be >= 0, got {self.min_bounce_frames}")

    def resolved(self) -> SynthConfig:
        """A copy with every auto (None) physics field replaced by its value for this image size."""
        sh, sw, smin = self.height / 64.0, self.width / 64.0, min(self.height, self.width) / 64.0
        radius = self.radius or (max(3.0, 4.0 * smin), max(3.0, 7.0 * smin))
        return dataclasses.replace(
            self,
            gravity=self.gravity if self.gravity is not None else 1.5 * sh,
            friction=self.friction or (0.08 * sw, 0.16 * sw),
            radius=radius,
            launch_speed=self.launch_speed or (2.0 * sw, 4.0 * sw),
            floor_height=self.floor_height or max(4, self.height // 8),
        )


@dataclass
class Scene:
    """A simulated clip before rendering: who is where at every frame, and what happened."""

    kind: str
    colours: list[str]  # per ball, distinct
    radii: np.ndarray  # float64 (N,)
    track: np.ndarray  # float64 (T, N, 4): x, y, vx, vy
    on_floor: np.ndarray  # bool (T, N)
    events: list[dict]
    physics: Physics
    background: np.ndarray  # float32 (H, W, 3) in [0, 1], static
    caption: str
    states: list[list[dict]]
    meta: dict

    @property
    def centres(self) -> np.ndarray:
        """float64 (T, N, 2): ball centres x, y at every frame."""
        return self.track[..., :2]


def _clip_rngs(cfg: SynthConfig, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the scene and the background, from (seed, index) alone."""
    ss = np.random.SeedSequence([cfg.seed, index])
    scene_ss, bg_ss = ss.spawn(2)
    return np.random.default_rng(scene_ss), np.random.default_rng(bg_ss)


def _columns(rng: np.random.Generator, radii: np.ndarray, phys: Physics) -> np.ndarray:
    """x centres in separate equal columns of the room, so the balls never touch each other."""
    n = len(radii)
    span = (phys.right_wall - phys.left_wall) / n
    xs = np.empty(n)
    for k in range(n):
        lo = phys.left_wall + k * span + radii[k] + 1.0
        hi = phys.left_wall + (k + 1) * span - radii[k] - 1.0
        xs[k] = rng.uniform(lo, hi) if hi > lo else 0.5 * (lo + hi)
    return xs


def _draw_radii(rng: np.random.Generator, cfg: SynthConfig, n: int) -> np.ndarray:
    lo, hi = cfg.radius
    radii = rng.uniform(lo, hi, size=n)
    # n balls side by side must fit in the room with a gap
    return np.minimum(radii, max(2.0, cfg.width / (2 * n) - 1.5))


def _scene_balls(
    kind: str, rng: np.random.Generator, cfg: SynthConfig, phys: Physics
) -> tuple[list[Ball], list[dict]]:
    """Initial conditions for a scene kind, and how the caption names each ball's launch."""
    g, yf = phys.gravity, phys.floor_y
    span_t = cfg.num_frames - 1
    v_lo, v_hi = cfg.launch_speed
    if kind in ("static", "bounce"):
        n = int(rng.integers(1, cfg.max_balls + 1))
        radii = _draw_radii(rng, cfg, n)
        xs = _columns(rng, radii, phys)
        if kind == "static":
            balls = [Ball(r, x, yf - r, on_floor=True) for r, x in zip(radii, xs, strict=True)]
            return balls, [{"action": "rests"}] * n
        balls = []
        for r, x in zip(radii, xs, strict=True):
            room = (yf - r) - (r + 1.0)  # highest drop that starts fully inside the image
            balls.append(Ball(r, x, yf - r - rng.uniform(0.45, 0.95) * room))
        return balls, [{"action": "falls"}] * n
    if kind == "throw":
        r = float(_draw_radii(rng, cfg, 1)[0])
        d = 1.0 if rng.random() < 0.5 else -1.0
        start = rng.uniform(0.0, 0.2) * cfg.width
        x = phys.left_wall + r + 1.0 + start if d > 0 else phys.right_wall - r - 1.0 - start
        y = rng.uniform(0.25, 0.65) * yf
        y = min(max(y, r + 1.0), yf - r - 1.0)
        v_up = math.sqrt(2.0 * g * max(0.0, y - r - 1.0))  # the apex stays inside the image
        vy = -rng.uniform(0.2, 0.9) * v_up
        return [Ball(r, x, y, d * rng.uniform(v_lo, v_hi), vy)], [{"action": "thrown", "dir": _side(d)}]
    if kind == "roll":
        r = float(_draw_radii(rng, cfg, 1)[0])
        d = 1.0 if rng.random() < 0.5 else -1.0
        start = rng.uniform(0.0, 0.3) * cfg.width
        x = phys.left_wall + r + 1.0 + start if d > 0 else phys.right_wall - r - 1.0 - start
        # fast enough to cross the room in a 17-frame clip: it may reach the far wall (the caption says so)
        v = rng.uniform(v_lo, v_hi) * 1.4
        return [Ball(r, x, yf - r, d * v, on_floor=True)], [{"action": "rolls", "dir": _side(d)}]
    if kind == "collide":
        return _collide_balls(rng, cfg, phys, span_t)
    raise ValueError(f"unknown motion kind {kind!r}; valid kinds: {', '.join(MOTIONS)}")


def _collide_balls(
    rng: np.random.Generator, cfg: SynthConfig, phys: Physics, span_t: int
) -> tuple[list[Ball], list[dict]]:
    """Two balls thrown towards each other so that they meet in the air.

    Under the same gravity the relative motion of two airborne balls is a straight line, so aiming the
    centres to be a vertical offset |delta| < rA + rB apart at time tc guarantees a contact before tc. A
    parabola (y down, g > 0) is highest between its ends, so both ends above the floor keep the flight
    clear of it.
    """
    g, yf = phys.gravity, phys.floor_y
    v_lo, v_hi = cfg.launch_speed
    ra, rb = _draw_radii(rng, cfg, 2)
    best = None
    for _ in range(200):
        tc = max(1.5, rng.uniform(0.3, 0.55) * span_t)
        xm = 0.5 * (phys.left_wall + phys.right_wall) + rng.uniform(-0.1, 0.1) * cfg.width
        ym = rng.uniform(0.3, 0.6) * yf
        va = min(rng.uniform(v_lo, v_hi), (xm - phys.left_wall - ra - 1.0) / tc)
        vb = min(rng.uniform(v_lo, v_hi), (phys.right_wall - rb - 1.0 - xm) / tc)
        delta = rng.uniform(-0.6, 0.6) * min(ra, rb)
        ends = []
        for r, sign, v, off in ((ra, 1.0, va, -0.5 * delta), (rb, -1.0, vb, 0.5 * delta)):
            y0 = rng.uniform(0.35, 0.85) * yf
            y_tc = ym + off
            vy = (y_tc - y0 - 0.5 * g * tc * tc) / tc
            apex = y0 - vy * vy / (2.0 * g) if vy < 0.0 and -vy / g < tc else min(y0, y_tc)
            ok = r + 1.0 <= apex and max(y0, y_tc) <= yf - r - 1.0
            ends.append((ok, Ball(r, xm - sign * v * tc, y0, sign * v, vy)))
        if va >= 0.5 * v_lo and vb >= 0.5 * v_lo and all(ok for ok, _ in ends):
            best = [b for _, b in ends]
            break
        best = best or [b for _, b in ends]
    return best, [{"action": "thrown", "dir": "right"}, {"action": "thrown", "dir": "left"}]


def _states(
    track: np.ndarray, on_floor: np.ndarray, colours: list[str], radii: np.ndarray
) -> list[list[dict]]:
    out = []
    for t in range(track.shape[0]):
        row = []
        for k, name in enumerate(colours):
            x, y, vx, vy = (float(v) for v in track[t, k])
            row.append(
                {
                    "id": k,
                    "shape": "ball",
                    "colour": name,
                    "rgb": list(COLOURS[name]),
                    "x": x,
                    "y": y,
                    "vx": vx,
                    "vy": vy,
                    "radius": round(float(radii[k]), _DECIMALS),
                    "on_floor": bool(on_floor[t, k]),
                }
            )
        out.append(row)
    return out


def _background(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """Static (H, W, 3) float32 background: wall above, floor band below, optional grey texture."""
    h, w, fh = cfg.height, cfg.width, cfg.floor_height
    img = np.empty((h, w, 3))
    img[: h - fh] = _WALL_RGB
    img[h - fh :] = _FLOOR_RGB
    img[h - fh] += 0.08  # a lit floor edge, so the floor line reads clearly
    if cfg.background == "textured":
        yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w], dtype=np.float64)[:, None, None]
        tex = np.zeros((h, w))
        for _ in range(6):  # a few random plane waves: smooth, static, grey (never a ball colour)
            fy, fx = rng.uniform(-8.0, 8.0, size=2)
            tex += np.cos(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
        tex *= 0.035
        # floor planks: vertical joints at random spacing
        joints = np.cos(2 * np.pi * rng.uniform(3.0, 6.0) * xx + rng.uniform(0, 2 * np.pi))
        tex[h - fh + 1 :] += 0.04 * joints[h - fh + 1 :]
        img += tex[..., None]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def simulate_scene(cfg: SynthConfig, index: int) -> Scene:
    """Draw and simulate clip `index` (no rendering): states, events, caption and metadata.

    Args:
        cfg: the playground config (auto fields are resolved here).
        index: clip number; the scene depends on (cfg.seed, index) only.

    Returns:
        The `Scene`, including the static background image.
    """
    cfg = cfg.resolved()
    rng, bg_rng = _clip_rngs(cfg, index)
    weights = None
    if cfg.motion_weights is not None:
        weights = np.asarray(cfg.motion_weights, dtype=np.float64)
        weights = weights / weights.sum()
    kind = str(cfg.motions[int(rng.choice(len(cfg.motions), p=weights))])
    phys = Physics(
        gravity=float(cfg.gravity),
        restitution=float(rng.uniform(*cfg.restitution)),
        friction=float(rng.uniform(*cfg.friction)),
        floor_y=cfg.height - cfg.floor_height - 0.5,
        left_wall=-0.5,
        right_wall=cfg.width - 0.5,
        substeps=cfg.substeps,
        # a rebound at speed v flies 2 v / g frames: slower ones would flicker, so they land instead
        settle_speed=0.5 * cfg.gravity * cfg.min_bounce_frames,
    )
    balls, launches = _scene_balls(kind, rng, cfg, phys)
    n = len(balls)
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=n, replace=False)]
    radii = np.round(np.array([b.radius for b in balls]), _DECIMALS)
    for b, r in zip(balls, radii, strict=True):
        b.radius = float(r)
    track, on_floor, events = run_physics(balls, phys, cfg.num_frames)
    caption = _caption(kind, colours, launches, events, track)
    bounces = [sum(ev["type"] == "bounce" and ev["ball"] == k for ev in events) for k in range(n)]
    meta = {
        "motion": kind,
        "num_balls": n,
        "colours": colours,
        "bounces": bounces,
        "collisions": sum(ev["type"] == "collision" for ev in events),
        "events": events,
        "physics": phys.as_dict(),
        "draw_order": list(range(n)),  # back to front
        "seed": cfg.seed,
        "index": index,
    }
    return Scene(
        kind=kind,
        colours=colours,
        radii=radii,
        track=track,
        on_floor=on_floor,
        events=events,
        physics=phys,
        background=_background(bg_rng, cfg),
        caption=caption,
        states=_states(track, on_floor, colours, radii),
        meta=meta,
    )

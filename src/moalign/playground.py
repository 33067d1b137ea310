"""The synthetic physics playground: a procedural 2-D world whose physics and optical flow are known exactly.

No model weights or data sets can be downloaded where the product is developed, so this module is the
embedded default data source for every stage (SPEC section 5). Everything is numpy; a clip is a pure
function of ``(cfg.seed, index)``, so clip ``i`` is the same whatever ``num_clips`` is.

World (side view)
    Image coordinates: pixel (row i, column j) has its centre at (x=j, y=i); the image covers
    [-0.5, W-0.5] x [-0.5, H-0.5]; y grows downwards and gravity points to +y. The floor is a band of
    ``floor_height`` rows at the bottom, its surface at ``floor_y = H - floor_height - 0.5``; the walls are
    the left and right image edges (x = -0.5 and x = W - 0.5). Units are pixels and frames: velocities in
    px/frame, gravity and friction in px/frame^2.

Physics (`run_physics`)
    Balls are discs, mass proportional to radius^2. Each frame interval is split into ``substeps``; inside
    a substep every ball moves analytically (a parabola in the air, constant friction deceleration on the
    floor) and its floor and wall impacts are found at their exact time, so a bounce inside a frame
    interval lands where it should. Floor and wall impacts reverse the normal velocity times the
    restitution e. A floor impact whose rebound would last less than ``min_bounce_frames`` frames instead
    lands the ball (it then rolls: friction slows it, no gravity), which stops the endless micro-bounces.
    Ball-ball contacts are resolved at the end of each substep with the impulse of restitution e along
    the line of centres (momentum conserved exactly) and an inverse-mass split of the overlap (which
    keeps the centre of mass in place). Restitution and friction are drawn per clip.

Scene kinds (`MOTIONS`)
    ``bounce``: 1..max_balls balls dropped from rest at different heights in separate columns.
    ``throw``: one ball thrown from one side towards the other (projectile); it may reach the far wall.
    ``roll``: one ball moves along the floor and slows down with friction; it may reach the far wall.
    (Balls never rotate: "rolls" is what the caption calls a ball moving on the floor.)
    ``collide``: two balls thrown towards each other that meet in the air (guaranteed: under the same
    gravity their relative motion is a straight line, aimed to pass closer than the sum of the radii).
    ``static``: 1..max_balls balls resting on the floor (a control: frames identical, flow exactly 0).

Rendering and exact flow (`render_scene`, `exact_flow`)
    Balls translate rigidly (no rotation) and carry a fixed smooth shading (darker rim, soft highlight),
    so their interior is not flat; edges are anti-aliased by coverage ``clip(r + 0.5 - d, 0, 1)`` blended
    over what lies beneath. Draw order (depth) is the ball id: ball 0 at the back. The background (wall,
    floor band, optional static texture) never moves. The visible top surface at a pixel is the last
    ball drawn whose centre is closer than its radius, else the background. Forward flow t -> t+1 at a
    pixel showing ball k is ``c_k(t+1) - c_k(t)`` (the actual displacement between the rendered frames);
    on background pixels it is 0. ``valid`` is True where that surface point is still the visible top
    surface at ``x + flow`` in frame t+1 and ``x + flow`` lies inside the image area.

Caption grammar (parse it with these rules)
    caption  := clause | clause ", and " clause | clause ", " clause ", and " clause   (one per ball group)
    clause   := subject " " phrase
    subject  := ball | ball " and " ball | ball ", " ball " and " ball     (several balls share one phrase)
    ball     := "a <colour> ball" | "an <colour> ball"      ("an" before a vowel: "an orange ball")
    phrase   := action | action " and " extra | action ", " extra ", " ... " and " extra
    action   := "falls" | "is thrown to the left" | "is thrown to the right" | "rolls to the left"
                | "rolls to the right" | "rests on the floor"
                | "rest on the floor" | "collide in the air" | "collide"        (plural subjects only)
    extra    := "bounces <N> on the floor" | "lands on the floor" | "hits the left wall" [" " <N>]
                | "hits the right wall" [" " <N>] | "hits the <colour> ball" | "slows down" | "stops"
    <N>      := "once" | "twice" | "three times" | ... | "ten times" | "<digits> times"
    Extras come in that fixed order (not necessarily the order in time) and only name what happened
    within the clip ("lands" is a floor contact with no rebound). Every "a/an <colour> ball" is one ball
    (colours within a clip are distinct), so their number is the ball count; the motion words are falls,
    bounces, thrown, rolls, collide, rest(s); a wall hit count is omitted when it is one.
    Examples: "a red ball falls and bounces twice on the floor"; "a blue ball is thrown to the right,
    bounces once on the floor and hits the right wall"; "a green ball rolls to the left and slows down";
    "a red ball and a yellow ball collide in the air"; "a purple ball and a white ball rest on the floor";
    "a cyan ball falls and bounces once on the floor, and an orange ball falls and bounces twice on the
    floor".

Files (`write_playground`)
    ``videos/clip_{i:05d}.mp4`` (H.264), ``flow/clip_{i:05d}.safetensors`` (``flow`` float32 (T-1, H, W, 2),
    x then y, pixels; ``valid`` uint8 (T-1, H, W)), ``metadata.jsonl`` (one row per clip, states inline)
    and ``playground.json`` (the resolved config). Same config, same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moalign.atomic import save_safetensors, write_json, write_jsonl
from moalign.errors import MoalignError
from moalign.video_io import write_video

# Saturated, well separated hues (red 0, orange 30, yellow 55, green 130, cyan 185, blue 225, purple 275
# degrees, plus white), so a judge can tell them apart after lossy yuv420p compression. The background
# is a dark, nearly grey palette that none of them can be confused with.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
    "cyan": (40, 205, 215),
    "white": (240, 240, 240),
}

MOTIONS: tuple[str, ...] = ("bounce", "throw", "roll", "collide", "static")

_WALL_RGB = np.array([0.33, 0.34, 0.37])
_FLOOR_RGB = np.array([0.25, 0.21, 0.18])
_COUNT_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times", 6: "six times"}
_COUNT_WORDS.update({7: "seven times", 8: "eight times", 9: "nine times", 10: "ten times"})
_DECIMALS = 4  # states and events are rounded once, and the renderer uses the rounded positions


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    """What `write_playground` generates. Physics fields left at None scale with the image size.

    Units are pixels and frames. Auto values (the 64x64 reference scaled by height/64 for vertical
    quantities, width/64 for horizontal ones, min(H, W)/64 for radii) are filled in by `resolved()`.
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
        # Accept what JSON and CLI overrides produce (lists, "a,b" strings) and store tuples.
        for name in ("motions", "motion_weights", "restitution", "friction", "radius", "launch_speed"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(s.strip() for s in value.split(",") if s.strip())
            if isinstance(value, list):
                value = tuple(value)
            object.__setattr__(self, name, value)
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the resolved config (tuples as lists); `from_dict` reads it back."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.resolved()).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthConfig:
        """Build a config from `to_dict` output (or any subset of the fields)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SynthConfig field(s) {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**data)


@dataclass(frozen=True)
class Physics:
    """The constants of one clip's world, in px and frames (`SynthConfig.resolved` plus per-clip draws)."""

    gravity: float  # px/frame^2, +y (down)
    restitution: float  # e: normal velocity is reversed times e at floor, walls and ball-ball contacts
    friction: float  # px/frame^2 deceleration of a ball rolling on the floor
    floor_y: float  # y of the floor surface (a resting ball has y = floor_y - radius)
    left_wall: float = -0.5  # x of the left wall surface (the image edge)
    right_wall: float = 63.5  # x of the right wall surface
    substeps: int = 16
    settle_speed: float = 0.0  # rebounds slower than this (px/frame) land the ball instead

    def as_dict(self) -> dict[str, float]:
        """JSON-ready dict (this is the manifest's ``physics`` column)."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class Ball:
    """Initial conditions of one ball for `run_physics`."""

    radius: float
    x: float
    y: float
    vx: float = 0.0
    vy: float = 0.0
    on_floor: bool = False  # starts rolling/resting on the floor (y is then set to floor_y - radius)


# ---------------------------------------------------------------------------------------------------
# Physics
# ---------------------------------------------------------------------------------------------------


class _Body:
    """Mutable state of one ball during integration."""

    __slots__ = ("x", "y", "vx", "vy", "r", "m", "floor", "yf", "xl", "xr")

    def __init__(self, ball: Ball, phys: Physics):
        self.r = float(ball.radius)
        self.m = self.r * self.r  # discs of one material: mass ~ area
        self.yf = phys.floor_y - self.r  # centre height when touching the floor
        self.xl, self.xr = phys.left_wall + self.r, phys.right_wall - self.r
        self.x, self.vx = float(ball.x), float(ball.vx)
        self.floor = bool(ball.on_floor)
        self.y, self.vy = (self.yf, 0.0) if self.floor else (float(ball.y), float(ball.vy))


def _advance(b: _Body, tau: float, g: float, mu: float) -> None:
    """Move a body for `tau` frames with no event inside (callers stop at the first event)."""
    if b.floor:
        if b.vx != 0.0 and mu > 0.0:
            s = 1.0 if b.vx > 0 else -1.0
            b.x += b.vx * tau - 0.5 * s * mu * tau * tau
            b.vx -= s * mu * tau
            if b.vx * s < 0.0:  # round-off past the stop time
                b.vx = 0.0
        else:
            b.x += b.vx * tau
    else:
        b.x += b.vx * tau
        b.y += b.vy * tau + 0.5 * g * tau * tau
        b.vy += g * tau


def _floor_time(b: _Body, g: float) -> float:
    """Time until an airborne body touches the floor (0 if it is there and not moving up)."""
    gap = b.yf - b.y  # >= 0 above the floor
    if gap <= 0.0:
        return 0.0 if b.vy >= 0.0 else math.inf
    # y + vy t + g t^2 / 2 = yf has one positive root when gap > 0 and g > 0
    return (-b.vy + math.sqrt(b.vy * b.vy + 2.0 * g * gap)) / g


def _wall_time(b: _Body, mu: float) -> tuple[float, str]:
    """Time until the body reaches the wall it moves towards, and which wall."""
    if b.vx == 0.0:
        return math.inf, ""
    side = "right" if b.vx > 0 else "left"
    dist = (b.xr - b.x) if b.vx > 0 else (b.x - b.xl)
    speed = abs(b.vx)
    if dist <= 0.0:
        return 0.0, side
    if b.floor and mu > 0.0:
        disc = speed * speed - 2.0 * mu * dist
        return ((speed - math.sqrt(disc)) / mu if disc >= 0.0 else math.inf), side
    return dist / speed, side


def _step_body(b: _Body, k: int, dt: float, now: float, phys: Physics, events: list[dict]) -> None:
    """Integrate one body over one substep, resolving its floor, wall and stop events at their exact times."""
    g, mu, e = phys.gravity, phys.friction, phys.restitution
    if not b.floor and b.y > b.yf:  # pushed into the floor by a ball-ball correction
        b.y = b.yf
    rem = dt
    for _ in range(64):  # a handful of events per substep at most; the bound only guards round-off
        if rem <= 0.0:
            return
        tau, kind, side = rem, "", ""
        if not b.floor:
            tf = _floor_time(b, g)
            if tf <= tau:
                tau, kind = tf, "floor"
        tw, wside = _wall_time(b, mu)
        if tw <= tau:
            tau, kind, side = tw, "wall", wside
        if b.floor and b.vx != 0.0 and mu > 0.0:
            ts = abs(b.vx) / mu
            if ts <= tau:
                tau, kind = ts, "stop"
        _advance(b, tau, g, mu)
        rem -= tau
        now += tau
        if kind == "floor":
            v_in = b.vy
            b.y = b.yf
            if e * v_in < phys.settle_speed:
                b.floor, b.vy = True, 0.0
                events.append(
                    {"type": "land", "ball": k, "time": round(now, _DECIMALS), "speed_in": round(v_in, 4)}
                )
            else:
                b.vy = -e * v_in
                events.append(
                    {
                        "type": "bounce",
                        "ball": k,
                        "time": round(now, _DECIMALS),
                        "speed_in": round(v_in, 4),
                        "speed_out": round(e * v_in, 4),
                    }
                )
        elif kind == "wall":
            b.x = b.xr if side == "right" else b.xl
            b.vx = -e * b.vx
            events.append({"type": "wall", "ball": k, "side": side, "time": round(now, _DECIMALS)})
        elif kind == "stop":
            b.vx = 0.0
            events.append({"type": "stop", "ball": k, "time": round(now, _DECIMALS)})
    _advance(b, rem, g, mu)


def _collide_pairs(bodies: list[_Body], phys: Physics, now: float, events: list[dict]) -> None:
    """Resolve overlapping ball pairs: restitution impulse along the line of centres, then push apart."""
    e = phys.restitution
    for i in range(len(bodies)):
        for j in range(i + 1, len(bodies)):
            a, b = bodies[i], bodies[j]
            dx, dy = b.x - a.x, b.y - a.y
            dist = math.hypot(dx, dy)
            reach = a.r + b.r
            if dist >= reach or dist == 0.0:
                continue
            nx, ny = dx / dist, dy / dist
            inv = 1.0 / a.m + 1.0 / b.m
            vrel = (b.vx - a.vx) * nx + (b.vy - a.vy) * ny
            if vrel < 0.0:  # approaching: equal and opposite impulses conserve momentum
                jmp = -(1.0 + e) * vrel / inv
                a.vx -= jmp / a.m * nx
                a.vy -= jmp / a.m * ny
                b.vx += jmp / b.m * nx
                b.vy += jmp / b.m * ny
                events.append(
                    {
                        "type": "collision",
                        "balls": [i, j],
                        "time": round(now, _DECIMALS),
                        "on_floor": a.floor or b.floor,
                    }
                )
            # split the overlap by inverse mass, which leaves the centre of mass where it is
            corr = (reach - dist) / inv
            a.x -= corr / a.m * nx
            a.y -= corr / a.m * ny
            b.x += corr / b.m * nx
            b.y += corr / b.m * ny
            for c in (a, b):
                if c.floor:
                    if c.vy < 0.0:  # knocked upwards: airborne again
                        c.floor = False
                    else:  # the floor takes a downward push
                        c.vy, c.y = 0.0, c.yf
                c.x = min(max(c.x, c.xl), c.xr)
                c.y = min(c.y, c.yf)


def run_physics(
    balls: list[Ball], phys: Physics, num_frames: int
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Simulate balls in the room and sample their states at every frame.

    Args:
        balls: initial conditions at frame 0 (the ball id is the list index).
        phys: world constants (gravity, restitution, friction, floor and walls, substeps).
        num_frames: number of frames T; the simulation covers times 0 .. T-1 (in frames).

    Returns:
        track: float64 (T, N, 4): x, y, vx, vy of every ball at every frame, rounded to 1e-4.
        on_floor: bool (T, N): the ball is resting/rolling on the floor at that frame.
        events: time-ordered dicts: ``bounce`` (floor impact with rebound; speed_in, speed_out), ``land``
            (floor impact that stops the vertical motion), ``wall`` (side), ``stop`` (rolling ball came to
            rest), ``collision`` (balls [i, j], on_floor). Times are in frames.
    """
    bodies = [_Body(b, phys) for b in balls]
    n = len(bodies)
    track = np.zeros((num_frames, n, 4))
    on_floor = np.zeros((num_frames, n), dtype=bool)
    events: list[dict] = []
    dt = 1.0 / phys.substeps

    def record(t: int) -> None:
        for k, b in enumerate(bodies):
            track[t, k] = (b.x, b.y, b.vx, b.vy)
            on_floor[t, k] = b.floor

    record(0)
    for f in range(num_frames - 1):
        for s in range(phys.substeps):
            now = f + s * dt
            for k, b in enumerate(bodies):
                _step_body(b, k, dt, now, phys, events)
            _collide_pairs(bodies, phys, now + dt, events)
        record(f + 1)
    events.sort(key=lambda ev: ev["time"])
    return np.round(track, _DECIMALS), on_floor, events


# ---------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------


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


def _side(d: float) -> str:
    return "right" if d > 0 else "left"


def _count(n: int) -> str:
    return _COUNT_WORDS.get(n, f"{n} times")


def _join(parts: list[str], sep_last: str = " and ") -> str:
    """'a' | 'a and b' | 'a, b and c'."""
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + sep_last + parts[-1]


def _a(colour: str) -> str:
    """'a red ball', 'an orange ball'."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} ball"


def _subject(colours: list[str]) -> str:
    return _join([_a(c) for c in colours])


def _ball_phrase(k: int, launch: dict, colours: list[str], events: list[dict], track: np.ndarray) -> str:
    """Verb phrase of one ball, from its launch and the events that actually happened to it."""
    mine = [ev for ev in events if ev.get("ball") == k or k in ev.get("balls", ())]
    action = {
        "falls": "falls",
        "thrown": f"is thrown to the {launch.get('dir')}",
        "rolls": f"rolls to the {launch.get('dir')}",
        "rests": "rests on the floor",
    }[launch["action"]]
    extras = []
    bounces = sum(ev["type"] == "bounce" for ev in mine)
    if bounces:
        extras.append(f"bounces {_count(bounces)} on the floor")
    elif launch["action"] in ("falls", "thrown") and any(ev["type"] == "land" for ev in mine):
        extras.append("lands on the floor")
    walls: dict[str, int] = {}
    for ev in mine:
        if ev["type"] == "wall":
            walls[ev["side"]] = walls.get(ev["side"], 0) + 1
    for side, n in walls.items():
        extras.append(f"hits the {side} wall" + ("" if n == 1 else f" {_count(n)}"))
    hit = []
    for ev in mine:
        if ev["type"] == "collision":
            other = colours[ev["balls"][0] if ev["balls"][1] == k else ev["balls"][1]]
            if other not in hit:
                hit.append(other)
    extras += [f"hits the {c} ball" for c in hit]
    if launch["action"] == "rolls":
        if abs(track[-1, k, 2]) < abs(track[0, k, 2]):
            extras.append("slows down")
        if any(ev["type"] == "stop" for ev in mine):
            extras.append("stops")
    return _join([action] + extras)


def _caption(
    kind: str, colours: list[str], launches: list[dict], events: list[dict], track: np.ndarray
) -> str:
    """The clip's caption (grammar in the module docstring)."""
    n = len(colours)
    if kind == "static" and not events:
        return f"{_subject(colours)} {'rests' if n == 1 else 'rest'} on the floor"
    if kind == "collide":
        hits = [ev for ev in events if ev["type"] == "collision" and sorted(ev["balls"]) == [0, 1]]
        if hits:
            first = hits[0]
            landed_before = any(
                ev["type"] in ("bounce", "land") and ev["time"] <= first["time"] for ev in events
            )
            where = "" if first["on_floor"] or landed_before else " in the air"
            return f"{_subject(colours[:2])} collide{where}"
    clauses = [f"{_a(colours[k])} {_ball_phrase(k, launches[k], colours, events, track)}" for k in range(n)]
    return _join(clauses, ", and ")


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


# ---------------------------------------------------------------------------------------------------
# Rendering and exact flow
# ---------------------------------------------------------------------------------------------------


@dataclass
class Render:
    """Float render of a scene, with the per-pixel surface maps that define the exact flow."""

    frames: np.ndarray  # float32 (T, H, W, 3) in [0, 1]
    labels: np.ndarray  # int16 (T, H, W): visible top surface: ball id, or -1 for the background
    pure: (
        np.ndarray
    )  # int16 (T, H, W): ball id if fully covered by it, -1 untouched background, -2 mixed edge


def _ball_shading(rgb: np.ndarray, ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
    """Colour of a ball at offset (ux, uy) from its centre in radii: (...) -> (..., 3).

    Smooth everywhere (no clipping), so bilinear sampling of a moved ball is accurate: a rim darkening
    and a soft highlight up-left that blends towards white.
    """
    shade = 1.0 - 0.35 * (ux * ux + uy * uy)
    hl = 0.3 * np.exp(-((ux + 0.3) ** 2 + (uy + 0.3) ** 2) / 0.4)
    return rgb * (shade * (1.0 - hl))[..., None] + hl[..., None]


def render_scene(scene: Scene) -> Render:
    """Render every frame of a scene in float, with anti-aliased ball edges.

    Args:
        scene: a simulated scene (`simulate_scene`).

    Returns:
        `Render` with frames (T, H, W, 3) float32 in [0, 1] and the label maps `exact_flow` and the tests use.
    """
    t_len = scene.track.shape[0]
    h, w, _ = scene.background.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # pixel centres
    frames = np.broadcast_to(scene.background.astype(np.float64), (t_len, h, w, 3)).copy()
    labels = np.full((t_len, h, w), -1, dtype=np.int16)
    pure = np.full((t_len, h, w), -1, dtype=np.int16)
    for k in scene.meta["draw_order"]:  # back to front
        r = float(scene.radii[k])
        rgb = np.asarray(COLOURS[scene.colours[k]], dtype=np.float64) / 255.0
        dx = xx[None] - scene.track[:, k, 0, None, None]  # (T, H, W)
        dy = yy[None] - scene.track[:, k, 1, None, None]
        d = np.sqrt(dx * dx + dy * dy)
        cov = np.clip(r + 0.5 - d, 0.0, 1.0)  # area coverage of the pixel, linear across the edge
        frames += cov[..., None] * (_ball_shading(rgb, dx / r, dy / r) - frames)
        labels[d < r] = k
        pure[cov > 0.0] = -2
        pure[cov >= 1.0] = k
    return Render(np.clip(frames, 0.0, 1.0).astype(np.float32), labels, pure)


def exact_flow(scene: Scene, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact forward flow and its validity mask for every consecutive frame pair.

    Args:
        scene: the simulated scene.
        labels: int (T, H, W) visible top surface per frame (`Render.labels`).

    Returns:
        flow: float32 (T-1, H, W, 2), x then y, pixels: c_k(t+1) - c_k(t) on ball k, 0 on the background.
        valid: bool (T-1, H, W): the surface point seen at x in frame t is the visible top surface at
            x + flow in frame t+1, and x + flow lies inside the image area.
    """
    t_len, h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    centres = scene.centres  # (T, N, 2)
    disp = centres[1:] - centres[:-1]  # (T-1, N, 2)
    order = list(scene.meta["draw_order"])
    lab0, lab1 = labels[:-1], labels[1:]
    flow = np.zeros((t_len - 1, h, w, 2), dtype=np.float64)
    # the background never moves, so it stays visible exactly where no ball covers it in frame t+1
    valid = (lab0 < 0) & (lab1 < 0)
    for depth, k in enumerate(order):
        mask = lab0 == k  # (T-1, H, W)
        flow += mask[..., None] * disp[:, k, None, None, :]
        dest_x = xx[None] + disp[:, k, 0, None, None]
        dest_y = yy[None] + disp[:, k, 1, None, None]
        ok = mask & (dest_x >= -0.5) & (dest_x < w - 0.5) & (dest_y >= -0.5) & (dest_y < h - 0.5)
        # rigid translation keeps the point on ball k; only a ball drawn in front can hide it at t+1
        for j in order[depth + 1 :]:
            cj = centres[1:, j]
            rj = float(scene.radii[j])
            ok &= (dest_x - cj[:, 0, None, None]) ** 2 + (dest_y - cj[:, 1, None, None]) ** 2 >= rj * rj
        valid |= ok
    return flow.astype(np.float32), valid


@dataclass
class Clip:
    """One rendered clip with its exact flow and ground truth."""

    frames: np.ndarray  # uint8 (T, H, W, 3)
    flow: np.ndarray  # float32 (T-1, H, W, 2): forward flow frame t -> t+1, pixels, x then y
    valid: np.ndarray  # bool (T-1, H, W)
    states: list[list[dict]]  # per frame, per object: id, shape, colour, rgb, x, y, vx, vy, radius, on_floor
    caption: str
    meta: dict  # motion, num_balls, colours, bounces, collisions, events, physics, draw_order, seed, index


def make_clip(cfg: SynthConfig, index: int) -> Clip:
    """Simulate, render and compute the exact flow of clip `index`.

    Args:
        cfg: the playground config.
        index: clip number; the clip depends on (cfg.seed, index) only, not on cfg.num_clips or other clips.

    Returns:
        The `Clip` (uint8 frames, exact flow and validity, per-frame states, caption, metadata).
    """
    scene = simulate_scene(cfg, index)
    render = render_scene(scene)
    flow, valid = exact_flow(scene, render.labels)
    frames = np.rint(render.frames * 255.0).astype(np.uint8)  # (T, H, W, 3)
    return Clip(
        frames=frames, flow=flow, valid=valid, states=scene.states, caption=scene.caption, meta=scene.meta
    )


# ---------------------------------------------------------------------------------------------------
# Writing a playground folder
# ---------------------------------------------------------------------------------------------------


def _manifest_row(cfg: SynthConfig, index: int, scene_meta: dict, caption: str, states: list) -> dict:
    name = f"clip_{index:05d}"
    meta = scene_meta
    return {
        "id": name,
        "video": f"videos/{name}.mp4",
        "flow": f"flow/{name}.safetensors",
        "caption": caption,
        "motion": meta["motion"],
        "num_frames": cfg.num_frames,
        "fps": cfg.fps,
        "height": cfg.height,
        "width": cfg.width,
        "seed": cfg.seed,
        "index": index,
        "num_balls": meta["num_balls"],
        "colours": meta["colours"],
        "bounces": meta["bounces"],
        "collisions": meta["collisions"],
        "physics": meta["physics"],
        "events": meta["events"],
        "states": states,
    }


def _check_folder(out_dir: Path, cfg: SynthConfig) -> None:
    """Refuse to mix clips of different configs in one folder (a resume must see the same config)."""
    cfg_path = out_dir / "playground.json"
    if cfg_path.is_file():
        try:
            stored = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MoalignError(
                f"{cfg_path} is unreadable ({err}). Use a new --out folder or delete {out_dir}."
            ) from err
        new = cfg.to_dict()
        # clip i does not depend on num_clips, so a folder can grow or be reused for fewer clips
        diff = sorted(k for k in set(stored) | set(new) if k != "num_clips" and stored.get(k) != new.get(k))
        if diff:
            raise MoalignError(
                f"{out_dir} already holds a playground written with a different config (differs in: "
                f"{', '.join(diff)}). Use a new --out folder or delete {out_dir}."
            )
    elif (out_dir / "metadata.jsonl").exists():
        raise MoalignError(
            f"{out_dir} holds a metadata.jsonl but no playground.json, so it is not a playground folder this "
            f"code wrote. Use a new --out folder or delete {out_dir}."
        )


def write_playground(out_dir: str | os.PathLike, cfg: SynthConfig, progress: bool = True) -> list[dict]:
    """Write `cfg.num_clips` clips: mp4 videos, exact flow files and a caption manifest.

    Files (relative to `out_dir`): ``videos/clip_{i:05d}.mp4``, ``flow/clip_{i:05d}.safetensors``
    (``flow`` float32 (T-1, H, W, 2), ``valid`` uint8 (T-1, H, W)), ``metadata.jsonl`` (one row per clip:
    id, video, flow, caption, motion, num_frames, fps, height, width, seed, index, num_balls, colours,
    bounces, collisions, physics, events, states) and ``playground.json`` (the resolved config). Every
    write is atomic and the same config gives byte-identical files. A folder written earlier with the
    same config is resumed: clips whose video and flow files exist are not rendered again.

    Args:
        out_dir: output folder (created if missing).
        cfg: the playground config.
        progress: show a tqdm progress bar.

    Returns:
        The manifest rows, in clip order.

    Raises:
        MoalignError: `out_dir` holds a playground written with a different config (num_clips aside).
    """
    import torch
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    cfg = cfg.resolved()
    _check_folder(out_dir, cfg)
    # written first, so an interrupted run can be resumed (and checked) later
    write_json(out_dir / "playground.json", cfg.to_dict())
    rows = []
    for i in tqdm(range(cfg.num_clips), desc="playground", unit="clip", disable=not progress):
        video = out_dir / "videos" / f"clip_{i:05d}.mp4"
        flow_path = out_dir / "flow" / f"clip_{i:05d}.safetensors"
        if video.is_file() and flow_path.is_file():  # atomic writes: a file that exists is complete
            scene = simulate_scene(cfg, i)
            rows.append(_manifest_row(cfg, i, scene.meta, scene.caption, scene.states))
            continue
        clip = make_clip(cfg, i)
        write_video(video, clip.frames, fps=cfg.fps, crf=cfg.crf)
        save_safetensors(
            flow_path,
            {"flow": torch.from_numpy(clip.flow), "valid": torch.from_numpy(clip.valid.astype(np.uint8))},
        )
        rows.append(_manifest_row(cfg, i, clip.meta, clip.caption, clip.states))
    write_jsonl(out_dir / "metadata.jsonl", rows)
    return rows


__all__ = [
    "COLOURS",
    "MOTIONS",
    "Ball",
    "Clip",
    "Physics",
    "Render",
    "Scene",
    "SynthConfig",
    "exact_flow",
    "make_clip",
    "render_scene",
    "run_physics",
    "simulate_scene",
    "write_playground",
]

"""Physics of the playground: discs under gravity with exact-time floor, wall and ball contacts.

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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

_DECIMALS = 4  # states and events are rounded once, and the renderer uses the rounded positions


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

"""Captions of playground scenes, and the parser the judge reads them back with.

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

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


_COUNT_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times", 6: "six times"}


_COUNT_WORDS.update({7: "seven times", 8: "eight times", 9: "nine times", 10: "ten times"})


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


_BALL_RE = re.compile(r"\ban? (\w+) ball\b")


_ACTION_RE = re.compile(
    r"\b(falls|is thrown to the (?:left|right)|rolls to the (?:left|right)|rests? on the floor|collide)\b"
)


_HIT_BALL_RE = re.compile(r"\bhits the (\w+) ball\b")


_NUMBER_WORDS = {
    "once": 1,
    "twice": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}


_BOUNCE_RE = re.compile(r"\bbounces (once|twice|\w+ times|\d+ times)\b")


@dataclass
class BallClaim:
    """What the caption says about one ball."""

    colour: str
    action: str  # "falls", "thrown", "rolls", "rests", "collide" or "" (none recognised)
    direction: str = ""  # "left" / "right" for thrown and rolls
    bounces: int = 0  # the count the caption names (0: no bounce said)
    partners: tuple[str, ...] = ()  # colours it collides with or hits


def _count_word(text: str) -> int:
    word = text.split()[0]
    if word.isdigit():
        return int(word)
    return _NUMBER_WORDS.get(word, 1)


def parse_caption(caption: str) -> list[BallClaim]:
    """Parse a playground caption (grammar in this module's docstring) into one claim per named ball.

    Subjects are the "a/an <colour> ball" mentions ("hits the <colour> ball" is an extra, not a subject);
    each action applies to the subjects since the previous action, and its phrase runs to the next subject.

    Args:
        caption: e.g. "a red ball falls and bounces twice on the floor, and a blue ball rests on the floor".

    Returns:
        One `BallClaim` per subject ball, in caption order (the list length is the ball count).
    """
    text = caption.strip().rstrip(".").lower()
    balls = list(_BALL_RE.finditer(text))
    actions = list(_ACTION_RE.finditer(text))
    claims: list[BallClaim] = []
    pending: list[str] = []
    events = sorted([(m.start(), "ball", m) for m in balls] + [(m.start(), "action", m) for m in actions])
    for pos, kind, m in events:
        if kind == "ball":
            pending.append(m.group(1))
            continue
        nxt = min((b.start() for b in balls if b.start() > pos), default=len(text))
        phrase = text[pos:nxt]
        verb = m.group(1)
        action, direction = verb, ""
        if verb.startswith("is thrown") or verb.startswith("rolls"):
            action = "thrown" if verb.startswith("is thrown") else "rolls"
            direction = verb.rsplit(" ", 1)[-1]
        elif verb.startswith("rest"):
            action = "rests"
        b = _BOUNCE_RE.search(phrase)
        bounces = _count_word(b.group(1)) if b else 0
        hits = tuple(_HIT_BALL_RE.findall(phrase))
        for c in pending:
            partners = hits
            if action == "collide":
                partners = tuple(o for o in pending if o != c) + hits
            claims.append(BallClaim(c, action, direction, bounces, partners))
        pending = []
    claims += [BallClaim(c, "") for c in pending]  # subjects with no recognised action
    return claims

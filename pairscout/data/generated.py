"""The built-in generated dataset: rendered scenes whose captions describe them.

Spec string: ``generated`` or ``generated:n=2000,seed=0,size=128`` (keys: see :data:`DEFAULTS`).

Each row is a pure function of ``(seed, row index, params)``: its scene is drawn from
``numpy.random.default_rng([seed, index])`` and rendered with PIL, so any row can be rendered in any
DataLoader worker, in any order, and always gives the same pixels and captions.

A scene is one main object (one of :data:`CLASSES`, its class is the row's label) with a named
colour, a size (small / medium / large), a rotation and a position on a 3 x 3 grid (``top left`` ...
``centre`` ... ``bottom right``), 0 to ``distractors`` smaller objects of other classes, a background
with a named colour and a style (plain, gradient, striped, checkered, speckled) and mild pixel noise.
Each row has two captions: a short one and a detailed one (class, colour, size, position,
background, distractors), each from several templates with different word orders. The class is
shape, which a pretrained CNN sees and raw pixels do not (colour, position and background vary
independently of it); the captions share structure a sentence encoder picks up.

Render time: about 1 ms per 128 px image on one CPU core.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pairscout.errors import DataError

GENERATOR_VERSION = 1
"""Bump whenever scene sampling, rendering or captions change: it is part of the fingerprint."""

CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "heart", "arrow", "crescent", "diamond",
)  # fmt: skip

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 30),
    "orange": (245, 135, 20),
    "purple": (135, 55, 175),
    "pink": (245, 125, 185),
    "brown": (125, 75, 35),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "light grey": (185, 185, 185),
    "dark grey": (75, 75, 75),
    "beige": (225, 205, 165),
    "pale blue": (175, 200, 235),
    "pale green": (180, 222, 180),
    "navy": (25, 35, 85),
}

BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient", "striped", "checkered", "speckled")

SIZES: dict[str, float] = {"small": 0.11, "medium": 0.17, "large": 0.25}
"""Object radius as a fraction of the image side."""

POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}
"""Grid cell (row, column) -> the phrase captions use."""

DEFAULTS: dict[str, int] = {"n": 1000, "seed": 0, "size": 128, "distractors": 2, "noise": 6, "classes": 10}
"""Spec keys: rows, seed, image side in pixels, max distractor objects, noise std (0-255 levels),
number of object classes (the first ``classes`` of :data:`CLASSES`). Noise is uniform per channel."""

_MIN_CONTRAST = 110.0  # min RGB distance between an object colour and the background colour
_ROTATION_DEG = 30.0  # rotation in [-30, 30] degrees (shapes stay recognisable: square vs diamond)


@dataclass(frozen=True)
class SceneObject:
    cls: int
    colour: str
    radius: float  # pixels
    cx: float
    cy: float
    angle: float  # radians


@dataclass(frozen=True)
class Scene:
    main: SceneObject
    size_name: str
    cell: tuple[int, int]
    distractors: tuple[SceneObject, ...]
    bg_colour: str
    bg_style: str
    bg_param: tuple[float, float]  # style-specific (direction, period)
    caption_templates: tuple[int, int]


def parse_spec(spec: str) -> dict[str, int]:
    """``generated[:k=v,...]`` -> full parameter dict (defaults filled in)."""
    params = dict(DEFAULTS)
    head, _, tail = spec.partition(":")
    if head.strip() != "generated":
        raise DataError(f"'{spec}' is not a generated-dataset spec.", fix="use 'generated' or 'generated:n=2000,seed=0,size=128'.")
    for part in filter(None, (p.strip() for p in tail.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in DEFAULTS:
            raise DataError(
                f"Unknown generated-dataset option '{part}' in '{spec}'.",
                fix=f"use key=value pairs with keys {', '.join(DEFAULTS)}, e.g. 'generated:n=2000,seed=0,size=128'.",
            )
        try:
            params[key] = int(value)
        except ValueError:
            raise DataError(f"Option '{key}' in '{spec}' must be an integer, got '{value}'.", fix=f"write e.g. '{key}={DEFAULTS[key]}'.") from None
    return check_params(params, spec)


MAX_ROWS = 1_000_000
"""Most rows the generator serves: sampling the captions alone takes ~0.5 ms a row on one core (a billion rows would
sit silent for days before the first image), and a million rows already take hours to encode per model."""


def check_params(params: dict[str, int], spec: str = "generated") -> dict[str, int]:
    from pairscout.bounds import SEED_MAX

    limits = {"n": (1, MAX_ROWS), "seed": (0, SEED_MAX), "size": (16, 4096), "distractors": (0, 2), "noise": (0, 64), "classes": (2, len(CLASSES))}
    for key, (lo, hi) in limits.items():
        v = params[key]
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi:,}]"
            why = (" (more would take hours to sample and days to encode before any result; for more rows pass your own data with --data)"
                   if key == "n" and hi is not None and v > hi else "")
            raise DataError(f"Generated-dataset option {key}={v:,} in '{spec}' is out of range.", fix=f"use {key} {rng}{why}.")
    return params


def fingerprint(params: dict[str, int]) -> str:
    """Content fingerprint: the content is a pure function of the generator version and params."""
    blob = json.dumps({"generator": "pairscout.generated", "version": GENERATOR_VERSION, **params}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


# --- scene sampling -------------------------------------------------------------------------------
def _pick_contrasting(rng: np.random.Generator, avoid: list[tuple[int, int, int]]) -> str:
    names = list(OBJECT_COLOURS)
    ok = [c for c in names if all(math.dist(OBJECT_COLOURS[c], a) >= _MIN_CONTRAST for a in avoid)]
    return ok[int(rng.integers(len(ok)))] if ok else names[int(rng.integers(len(names)))]


def sample_scene(seed: int, index: int, params: dict[str, int]) -> Scene:
    """The scene of row ``index``: depends only on ``(seed, index, params)``."""
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    s = float(params["size"])
    n_cls = params["classes"]
    bg_colour = list(BACKGROUND_COLOURS)[int(rng.integers(len(BACKGROUND_COLOURS)))]
    bg_style = BACKGROUND_STYLES[int(rng.integers(len(BACKGROUND_STYLES)))]
    bg_param = (float(rng.uniform(0, math.pi)), float(rng.uniform(0.04, 0.1)))
    bg_rgb = BACKGROUND_COLOURS[bg_colour]

    cls = int(rng.integers(n_cls))
    size_name = list(SIZES)[int(rng.integers(len(SIZES)))]
    radius = SIZES[size_name] * s * float(rng.uniform(0.9, 1.1))
    cell = (int(rng.integers(3)), int(rng.integers(3)))

    def place(cell: tuple[int, int], r: float) -> tuple[float, float]:
        cy, cx = ((np.array(cell) * 0.3 + 0.2) + rng.uniform(-0.04, 0.04, 2)) * s
        lo, hi = r + 1.0, s - r - 1.0
        return float(np.clip(cx, lo, hi)), float(np.clip(cy, lo, hi))

    cx, cy = place(cell, radius)
    main = SceneObject(cls, _pick_contrasting(rng, [bg_rgb]), radius, cx, cy, float(rng.uniform(-1, 1)) * math.radians(_ROTATION_DEG))

    distractors: list[SceneObject] = []
    n_d = int(rng.integers(params["distractors"] + 1))
    cells = [c for c in POSITIONS if c != cell]
    rng.shuffle(cells)
    for c in cells:
        if len(distractors) >= n_d:
            break
        r = radius * float(rng.uniform(0.45, 0.6))
        r = max(r, 0.06 * s)
        dx, dy = place(c, r)
        placed = [main, *distractors]
        if all(math.hypot(dx - o.cx, dy - o.cy) >= o.radius + r + 2 for o in placed):
            d_cls = int(rng.choice([k for k in range(n_cls) if k != cls]))
            colour = _pick_contrasting(rng, [bg_rgb])
            distractors.append(SceneObject(d_cls, colour, r, dx, dy, float(rng.uniform(-1, 1)) * math.radians(_ROTATION_DEG)))
    templates = (int(rng.integers(len(_SHORT))), int(rng.integers(len(_DETAILED))))
    return Scene(main, size_name, cell, tuple(distractors), bg_colour, bg_style, bg_param, templates)


# --- captions -------------------------------------------------------------------------------------
def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_SHORT = (
    "{a_size} {colour} {cls}",
    "{a_colour} {cls} {pos}",
    "{a_colour} {cls} on {a_bg} background",
    "{a_cls}, {colour}, {pos}",
    "{a_size} {cls} coloured {colour}",
)
_DETAILED = (
    "{A_size} {colour} {cls} {pos} on {a_style} {bg} background{with_d}.",
    "{Pos} there is {a_size} {colour} {cls}; the background is {style} {bg}{with_d}.",
    "{A_style} {bg} background with {a_size} {colour} {cls} {pos}{with_d}.",
    "This picture shows {a_colour} {cls} of {size} size {pos}, drawn over {a_style} {bg} background{with_d}.",
    "{A_colour} {cls}, {size}, sits {pos} of {a_style} {bg} background{with_d}.",
)
_STYLE_WORDS = {"plain": "plain", "gradient": "shaded", "striped": "striped", "checkered": "checkered", "speckled": "speckled"}


def scene_captions(scene: Scene) -> list[str]:
    """``[short, detailed]`` captions describing the scene."""
    m = scene.main
    d = [f"{_a(o.colour)} {CLASSES[o.cls]}" for o in scene.distractors]
    with_d = "" if not d else (", next to " + " and ".join(d))
    style = _STYLE_WORDS[scene.bg_style]
    f: dict[str, Any] = {
        "cls": CLASSES[m.cls],
        "a_cls": _a(CLASSES[m.cls]),
        "colour": m.colour,
        "a_colour": _a(m.colour),
        "size": scene.size_name,
        "a_size": _a(scene.size_name),
        "pos": POSITIONS[scene.cell],
        "bg": scene.bg_colour,
        "a_bg": _a(scene.bg_colour),
        "style": style,
        "a_style": _a(style),
        "with_d": with_d,
    }
    for k in ("size", "style", "colour"):
        f[f"A_{k}"] = f[f"a_{k}"].capitalize()
    f["Pos"] = f["pos"].capitalize()
    short_t, detailed_t = scene.caption_templates
    return [_SHORT[short_t].format(**f), _DETAILED[detailed_t].format(**f)]


# --- rendering ------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _background(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUND_COLOURS[scene.bg_colour], dtype=np.float32)
    dark = base.mean() > 110  # shade towards black on light colours, towards white on dark ones
    shade = base * 0.72 if dark else base + (255 - base) * 0.3
    style = scene.bg_style
    if style == "plain":
        return np.broadcast_to(base, (size, size, 3)).copy()
    if style == "speckled":
        t = (rng.random((size, size), dtype=np.float32) < 0.12).astype(np.float32)
        return base + t[..., None] * (shade - base)
    yy, xx = _grid(size)
    angle, period = scene.bg_param
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if style == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    elif style == "striped":
        t = (np.floor(u / (period * size)) % 2).astype(np.float32)
    else:  # checkered
        w = period * size * 1.5
        t = ((np.floor(xx / w) + np.floor(yy / w)) % 2).astype(np.float32)
    return base + t[..., None] * (shade - base)


def _rotate(points: np.ndarray, obj: SceneObject) -> list[tuple[float, float]]:
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    x, y = points[:, 0] * obj.radius, points[:, 1] * obj.radius
    xr, yr = x * c - y * s + obj.cx, x * s + y * c + obj.cy
    return list(zip(xr.tolist(), yr.tolist(), strict=True))


@cache
def _unit_shape(cls: str) -> np.ndarray:
    """Polygon vertices of a class in unit-radius coordinates (y down), before rotation."""
    if cls == "square":
        p = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif cls == "triangle":
        p = [(math.cos(a), math.sin(a)) for a in np.radians([-90, 30, 150])]
    elif cls == "star":
        p = [((1.0 if k % 2 == 0 else 0.42) * math.cos(a), (1.0 if k % 2 == 0 else 0.42) * math.sin(a))
             for k, a in enumerate(np.radians(np.arange(10) * 36 - 90))]  # fmt: skip
    elif cls == "cross":
        a, b = 0.3, 0.9
        p = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif cls == "heart":
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        p = list(zip((x / 17).tolist(), ((y + 2.5) / 17).tolist(), strict=True))
    elif cls == "arrow":
        p = [(-0.95, -0.22), (0.2, -0.22), (0.2, -0.6), (0.95, 0.0), (0.2, 0.6), (0.2, 0.22), (-0.95, 0.22)]
    elif cls == "diamond":
        p = [(0.0, -1.0), (0.58, 0.0), (0.0, 1.0), (-0.58, 0.0)]
    elif cls == "crescent":
        # outer circle r=1 at 0 minus inner circle r2 at (d, 0); polygon = outer arc + inner arc
        r2, d = 0.85, 0.5
        x = (1 - r2**2 + d**2) / (2 * d)
        y = math.sqrt(1 - x**2)
        th = math.atan2(y, x)
        ph = math.atan2(y, x - d)
        outer = np.linspace(th, 2 * math.pi - th, 28)
        inner = np.linspace(2 * math.pi - ph, ph, 22)
        p = [(math.cos(a), math.sin(a)) for a in outer] + [(d + r2 * math.cos(a), r2 * math.sin(a)) for a in inner]
    else:  # circle, ring are drawn as ellipses
        p = []
    return np.asarray(p, dtype=np.float64).reshape(-1, 2)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    name = CLASSES[obj.cls]
    colour = OBJECT_COLOURS[obj.colour]
    r = obj.radius
    box = (obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r)
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "ring":
        draw.ellipse(box, outline=colour, width=max(2, round(r * 0.32)))
    else:
        draw.polygon(_rotate(_unit_shape(name), obj), fill=colour)


def render_scene(scene: Scene, seed: int, index: int, params: dict[str, int]) -> Image.Image:
    """Pixels of one scene (RGB, ``size x size``); deterministic in ``(seed, index, params)``."""
    size = params["size"]
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION, 1])  # pixel-level randomness only
    bg = _background(scene, size, rng)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in (*scene.distractors, scene.main):
        _draw_object(draw, obj)
    if params["noise"] > 0:  # uniform integer noise with std ~= params["noise"] (4x faster than Gaussian)
        k = max(1, round(params["noise"] * math.sqrt(3)))
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-k, k + 1, (size, size, 3), dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


class GeneratedImages:
    """Image source of the generated dataset: renders row ``j`` on demand (picklable, no state)."""

    kind = "generated"
    can_fail = False

    def __init__(self, params: dict[str, int]) -> None:
        self.params = dict(params)
        self.seed = params["seed"]

    def __len__(self) -> int:
        return self.params["n"]

    def image_id(self, j: int) -> str:
        return f"generated:{self.seed}:{j}"

    def open(self, j: int) -> Image.Image:
        scene = sample_scene(self.seed, j, self.params)
        return render_scene(scene, self.seed, j, self.params)

    def digest(self, j: int) -> bytes:  # unused: the dataset fingerprint comes from the params
        return hashlib.blake2b(self.open(j).tobytes(), digest_size=16).digest()


def generated_rows(params: dict[str, int]) -> tuple[list[list[str]], np.ndarray]:
    """Captions and labels of every row (scene sampling only, no rendering)."""
    captions, labels = [], np.empty(params["n"], dtype=np.int64)
    for i in range(params["n"]):
        scene = sample_scene(params["seed"], i, params)
        captions.append(scene_captions(scene))
        labels[i] = scene.main.cls
    return captions, labels

"""ShapeWorld geometry: the vocabulary, shape outlines, rasterisation and backgrounds.

Everything here is deterministic and free of global state. Coordinates:

- *normalised* image coordinates are ``(x, y)`` in ``[0, 1]``, ``x`` to the right and ``y`` downwards
  (image convention), so "above" means a smaller ``y``;
- a shape outline is a polygon in *unit* coordinates whose bounding box is centred on ``(0, 0)`` and
  whose larger side is at most ``2``; an object of diameter ``d`` (normalised) is drawn with the
  outline scaled by ``d / 2``. The object's centre is therefore the centre of its bounding box, which is
  also what the judge measures.

The vocabulary is deliberately small and regular, chosen so that a simple detector separates every
shape and every colour at 64 px even after blur (see :mod:`harmon.eval.judge`):

- 8 colours, saturated and far apart in RGB, all bright against the dark backgrounds;
- 7 shapes drawn upright (no rotation), whose area/bounding-box ratio, convexity, aspect ratio,
  up-down symmetry and vertical mass distribution differ;
- 6 dark, low-saturation backgrounds, plain or with a low-contrast smooth texture.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------
# Vocabulary

#: Colour name -> nominal sRGB. Neighbours in hue (red/orange/yellow, blue/purple, green/cyan) are kept
#: at least ~95 apart in RGB so per-object jitter (+-12) and generator colour noise cannot flip them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 35, 35),
    "orange": (250, 135, 20),
    "yellow": (240, 230, 40),
    "green": (40, 190, 55),
    "cyan": (40, 215, 225),
    "blue": (40, 85, 240),
    "purple": (170, 55, 225),
    "white": (240, 240, 240),
}

#: Shape name -> plural form used in captions.
SHAPES: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "star": "stars",
    "cross": "crosses",
    "semicircle": "semicircles",
}

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)

#: Background name -> nominal sRGB. All dark and nearly grey so that every object colour, including
#: white, stands >= ~140 away from the background in RGB.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 20),
    "dark gray": (52, 52, 54),
    "dark blue": (24, 30, 58),
    "dark green": (24, 46, 32),
    "dark brown": (56, 40, 26),
    "dark purple": (44, 28, 52),
}

#: Relations as GenEval names them (the key), with the phrase used in captions.
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

#: Most objects one scene holds; 5+ are refused (they would not fit at 64 px without overlaps or
#: shrinking shapes below what the judge classifies reliably).
MAX_OBJECTS = 4
MIN_SIZE, MAX_SIZE = 64, 512


def check_color(name: str) -> str:
    """Return ``name`` if it is a ShapeWorld colour, else raise ValueError naming the choices."""
    if name not in COLORS:
        raise ValueError(f"unknown colour {name!r}; expected one of {list(COLOR_NAMES)}")
    return name


def check_shape(name: str) -> str:
    """Return ``name`` if it is a ShapeWorld shape (singular), else raise ValueError."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; expected one of {list(SHAPE_NAMES)}")
    return name


def check_relation(name: str) -> str:
    """Return ``name`` if it is a GenEval relation name, else raise ValueError."""
    if name not in RELATIONS:
        raise ValueError(f"unknown relation {name!r}; expected one of {list(RELATIONS)}")
    return name


def check_size(size: int) -> int:
    """Validate an image side length in pixels (64..512)."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
        raise ValueError(f"image size must be an int, got {size!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"image size {size} px is out of range; expected {MIN_SIZE}..{MAX_SIZE} px")
    return int(size)


# ----------------------------------------------------------------------------------------------------
# Outlines


def _bbox_centred(points: np.ndarray) -> np.ndarray:
    lo, hi = points.min(0), points.max(0)
    return points - (lo + hi) / 2


def _regular(n: int, radius: float, phase_deg: float) -> np.ndarray:
    a = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


@lru_cache(maxsize=None)
def outline(shape: str) -> np.ndarray | None:
    """Unit outline of ``shape``: float64 array (V, 2) of (x, y) vertices, or None for the circle.

    The bounding box is centred on the origin and its larger side is <= 2. The sizes are chosen so
    that the shapes look about equally heavy (the square is smaller than its bounding circle).
    """
    check_shape(shape)
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.82
        p = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif shape == "triangle":
        # Upright equilateral triangle, base at the bottom: width 2, height sqrt(3).
        p = np.array([[0.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * np.array([1.0, math.sqrt(3) / 2])
    elif shape == "diamond":
        # Taller than wide so it cannot be mistaken for a rotated square.
        p = np.array([[0.0, -1.0], [0.72, 0.0], [0.0, 1.0], [-0.72, 0.0]])
    elif shape == "star":
        # Five points, pointing up; a fat inner radius keeps the arms >= ~4 px wide at 64 px.
        outer = _regular(5, 1.0, -90.0)
        inner = _regular(5, 0.47, -90.0 + 36.0)
        p = np.empty((10, 2))
        p[0::2], p[1::2] = outer, inner
        p = _bbox_centred(p)
        p = p * (2.0 / max(np.ptp(p[:, 0]), np.ptp(p[:, 1])))
    elif shape == "cross":
        a, w = 0.92, 0.32  # arm half-length, arm half-width
        p = np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a],
                      [-w, w], [-a, w], [-a, -w], [-w, -w]])
    elif shape == "semicircle":
        # Dome up, flat side down: half as tall as wide, unlike any other shape.
        t = np.linspace(0.0, np.pi, 33)
        p = np.stack([np.cos(t), -np.sin(t)], 1)
    else:  # pragma: no cover - check_shape guards
        raise AssertionError(shape)
    return _bbox_centred(np.asarray(p, dtype=np.float64))


@lru_cache(maxsize=None)
def half_extent(shape: str) -> tuple[float, float]:
    """Half width and half height of ``shape``'s bounding box in unit coordinates."""
    p = outline(shape)
    if p is None:
        return 1.0, 1.0
    return float(np.abs(p[:, 0]).max()), float(np.abs(p[:, 1]).max())


@lru_cache(maxsize=None)
def circumradius(shape: str) -> float:
    """Radius of the smallest origin-centred disc holding ``shape`` (unit coordinates)."""
    p = outline(shape)
    return 1.0 if p is None else float(np.sqrt((p ** 2).sum(1)).max())


def shape_alpha(shape: str, cx: float, cy: float, radius: float, height: int, width: int,
                supersample: int = 4) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of one shape, cut to its bounding box.

    Args:
        shape: shape name.
        cx, cy: centre in pixels (float, pixel centres at integer + 0.5).
        radius: half the diameter in pixels (the unit outline is scaled by it).
        height, width: image size in pixels; the result is clipped to it.
        supersample: sub-pixel factor of the rasteriser (4 gives smooth edges).

    Returns:
        ``(alpha, y0, x0)``: float32 array (h, w) in [0, 1] to be placed at rows ``y0:y0+h`` and
        columns ``x0:x0+w`` of the image (possibly empty when the shape is outside it).
    """
    hx, hy = half_extent(shape)
    x0 = max(int(math.floor(cx - hx * radius)) - 1, 0)
    y0 = max(int(math.floor(cy - hy * radius)) - 1, 0)
    x1 = min(int(math.ceil(cx + hx * radius)) + 1, width)
    y1 = min(int(math.ceil(cy + hy * radius)) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.float32), y0, x0
    s = supersample
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    # Supersampled coordinates: pixel (i, j) of the canvas covers [j/s, (j+1)/s) image pixels.
    ox, oy = (cx - x0) * s, (cy - y0) * s
    r = radius * s
    p = outline(shape)
    if p is None:
        draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=255)
    else:
        pts = [(ox + u * r, oy + v * r) for u, v in p]
        draw.polygon(pts, fill=255)
    small = canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0, y0, x0


# ----------------------------------------------------------------------------------------------------
# Backgrounds and image degradations


def make_background(size: int, rgb: tuple[float, float, float], texture: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Background of ``size`` x ``size`` px: float32 (size, size, 3) in 0..255.

    ``texture`` is the amplitude (RGB units) of a smooth, low-contrast luminance noise; 0 gives a plain
    background. The noise is drawn on a coarse grid and upsampled bicubically, so it has no edges the
    judge could take for an object.
    """
    bg = np.empty((size, size, 3), np.float32)
    bg[:] = np.asarray(rgb, np.float32)
    if texture > 0:
        k = int(rng.integers(3, 9))
        grid = rng.standard_normal((k, k)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC))
        smooth = smooth / max(float(np.abs(smooth).max()), 1e-6)
        grain = rng.standard_normal((size, size), dtype=np.float32) * 0.15
        bg += (texture * (smooth + grain))[..., None]
    return bg


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian, float32 (2 * ceil(3 sigma) + 1,)."""
    radius = max(int(math.ceil(3.0 * sigma)), 1)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders.

    Args:
        image: array (H, W) or (H, W, C), any numeric dtype.
        sigma: standard deviation in pixels (> 0; 0 returns a float copy).

    Returns:
        float32 array of the same shape.
    """
    x = np.asarray(image, dtype=np.float32)
    if sigma <= 0:
        return x.copy()
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    for axis in (0, 1):
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="reflect" if n > r else "edge")
        xp = np.moveaxis(xp, axis, 0)  # a view: slicing the first axis is cheap
        out = k[0] * xp[0:n]
        for i in range(1, len(k)):
            out += k[i] * xp[i:i + n]
        x = np.moveaxis(out, 0, axis)
    return np.ascontiguousarray(x)


def degrade(image, blur_sigma: float = 0.0, noise_std: float = 0.0, seed: int = 0) -> np.ndarray:
    """Blur then add Gaussian RGB noise, the way tests imitate a generator's output.

    Args:
        image: PIL image or uint8 array (H, W, 3).
        blur_sigma: Gaussian blur sigma in pixels (0 = none).
        noise_std: standard deviation of i.i.d. per-channel noise in 0..255 units (0 = none).
        seed: seed of the noise.

    Returns:
        uint8 array (H, W, 3).
    """
    x = np.asarray(image, dtype=np.float32)
    if blur_sigma > 0:
        x = gaussian_blur(x, blur_sigma)
    if noise_std > 0:
        x = x + np.random.default_rng(seed).standard_normal(x.shape, dtype=np.float32) * noise_std
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


#: GenEval's margin: centres must differ by more than this fraction of the summed box sizes.
POSITION_THRESHOLD = 0.1


def relative_position(box_a, box_b) -> set[str]:
    """Relations of box A to box B, decided the way GenEval decides them.

    Args:
        box_a, box_b: ``(x0, y0, x1, y1)`` in any common unit (y grows downwards).

    Returns:
        A subset of ``{"left of", "right of", "above", "below"}``: the centre offset, shrunk on each
        axis by ``POSITION_THRESHOLD`` times the summed box sizes, must point within 60 degrees of an
        axis. A diagonal offset can yield two relations; touching centres yield none.
    """
    a = np.asarray(box_a, np.float64).reshape(2, 2)
    b = np.asarray(box_b, np.float64).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    norm = float(np.linalg.norm(offset))
    if norm < 1e-9:
        return set()
    dims = (a[1] - a[0]) + (b[1] - b[0])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3 * max(norm, 1.0)):
        return set()
    dx, dy = revised / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def clear_relation(box_a, box_b, max_angle_deg: float = 35.0) -> str | None:
    """The one relation of A to B when it is unambiguous, else None.

    Unambiguous means GenEval finds exactly one relation and the centre offset lies within
    ``max_angle_deg`` of that axis, so a caption or an answer that names it is plainly true and the
    other axis' relations are plainly false.
    """
    rels = relative_position(box_a, box_b)
    if len(rels) != 1:
        return None
    a = np.asarray(box_a, np.float64).reshape(2, 2).mean(0)
    b = np.asarray(box_b, np.float64).reshape(2, 2).mean(0)
    dx, dy = np.abs(a - b)
    rel = next(iter(rels))
    major, minor = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
    if math.degrees(math.atan2(minor, major)) > max_angle_deg:
        return None
    return rel


def article(word: str) -> str:
    """'an' before a vowel sound, else 'a' (only our vocabulary matters: "an orange circle")."""
    return "an" if word[:1].lower() in "aeio" else "a"

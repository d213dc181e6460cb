"""The ShapeWorld judge: a deterministic detector and GenEval-style scoring of generated images.

Detection (:func:`detect`) works at a fixed working resolution (the longer side resized to
:data:`WORK_SIZE` px, so thresholds mean the same at 64 and at 512 px):

1. **Background.** The median colour of the image border (objects sit inside the image; a median
   ignores the few that touch the border).
2. **Foreground.** After a 3 x 3 box filter (which divides pixel noise by 3), pixels farther than
   :data:`FG_THRESHOLD` from the background are foreground; connected components of it are candidates.
3. **Colour, blend-aware.** A blurred edge pixel is a mix ``bg + a * (c - bg)`` of the background and the
   object colour ``c``. Each pixel is therefore matched to the palette colour whose *segment* from the
   background passes closest to it, which gives both its colour and its coverage ``a``. Pixels with
   ``a >= 0.5`` form the object (a half-coverage contour, where a blurred edge really is). A component
   whose pixels fall into two or more substantial colours (touching objects) is split by colour.
4. **Shape.** Scale-free features of each object mask (area / bounding box, area / convex hull, aspect
   ratio, share of the area in the upper half, up-down symmetry, fill of the box corners, hull
   perimeter^2 / hull area) are matched to their nearest neighbours among reference features measured
   once on the world's own outlines at many sizes, blurs and noise levels; too far from all of them,
   the shape is unknown (None).

Scoring (:func:`check_spec`) follows GenEval: every ``include`` entry needs ``count`` objects of its
shape (and colour); a ``position`` needs the relation, decided from box centres as GenEval does; every
``exclude`` entry fails the image when ``count`` or more of its shape are found. Per-category accuracy
is the mean over images; the overall score is the mean over categories (:func:`summarize`).

Beyond GenEval, each failed image is filed under the first criterion it fails (:data:`FAILURE_KINDS`),
and :func:`summarize` counts them per category together with how many objects were detected and how
many of those had no recognisable shape: what a generator gets wrong, not only how often.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from harmon.data.shapes import COLOR_NAMES, COLORS, SHAPE_NAMES, gaussian_blur, relative_position, shape_alpha
from harmon.data.shapeworld import GENEVAL_TAGS, PromptSpec

#: Side (px) of the working resolution. 128 keeps a 64 px image's shapes at >= ~25 px across after
#: upsampling (bilinear upsampling also gives sub-pixel edges), and makes a 512 px image cheap.
WORK_SIZE = 128
#: RGB distance from the background above which a (box-filtered) pixel may belong to an object. The
#: dimmest colour (green) is ~145 from the backgrounds; texture is < 15 and filtered noise ~ 10.
FG_THRESHOLD = 45.0
#: Smallest object, as a fraction of the working image area (the smallest shapes cover ~1.4%).
MIN_AREA_FRAC = 0.003
#: Largest plausible coverage of a matched colour beyond the nominal one (brighter generator output).
_ALPHA_MAX = 1.25
#: A component's colour must pass within this RGB distance of its palette segment, else 'unknown'.
COLOR_REJECT = 75.0
#: A colour holding this share of a component's pixels counts as a separate object (touching objects).
SPLIT_SHARE = 0.2
#: Shape distance (RMS over scaled features, see :func:`classify_shape`) beyond which the shape is
#: 'unknown', so random blobs get no name. The world's own objects stay below ~1.3 even blurred with
#: sigma = 1.5 px at 64 px plus noise (99% below 0.65); blobs of smooth noise have a median of ~2.8.
SHAPE_REJECT = 1.6
#: Largest object, as a fraction of the image: ShapeWorld's largest covers ~20%; a region covering more
#: than half the image is a background the border median missed, not an object.
MAX_AREA_FRAC = 0.5

_PALETTE = np.asarray([COLORS[c] for c in COLOR_NAMES], np.float32)  # (K, 3)

#: Why an image fails, by the first criterion it fails, in the order they are checked: too few
#: objects of an asked shape ("shape"), enough of the shape but too few in the asked colour
#: ("colour"), a relation not met ("position"), an excluded object present ("extra").
FAILURE_KINDS = ("shape", "colour", "position", "extra")


class ImageLoadError(ValueError):
    """An image file that cannot be read (corrupt, truncated, not an image)."""


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        shape: shape name, or None when no reference shape is close enough.
        color: colour name, or None when no palette colour is close enough.
        bbox: ``(x0, y0, x1, y1)`` normalised to [0, 1] (pixel edges).
        area: fraction of the image covered.
        shape_distance: distance to the chosen shape (see :func:`classify_shape`).
        color_distance: RGB distance of the object's median colour to its palette segment.
        features: the shape features (extent, solidity, log aspect, top share, hull compactness).
    """

    shape: str | None
    color: str | None
    bbox: tuple[float, float, float, float]
    area: float
    shape_distance: float
    color_distance: float
    features: tuple[float, ...] = field(default=(), repr=False)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2)


@dataclass(frozen=True)
class JudgeResult:
    """The verdict on one image for one spec."""

    tag: str
    prompt: str
    correct: bool
    reason: str
    split: str = "test"
    detections: tuple[Detection, ...] = field(default=(), repr=False)
    failure: str | None = None  # one of FAILURE_KINDS when not correct


# ----------------------------------------------------------------------------------------------------
# Input


def to_rgb_array(image: Any) -> np.ndarray:
    """Convert an image to float32 RGB (H, W, 3) in 0..255.

    Accepts a PIL image (any mode), a numpy array (H, W, 3|4) or (H, W) of uint8 (0..255) or float
    (0..1), or a torch tensor (3, H, W) / (H, W, 3) of uint8 or float (0..1). Raises ValueError otherwise.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32)
    if type(image).__module__.startswith("torch"):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    x = image
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image array of shape (H, W, 3), got {tuple(image.shape)}")
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    x = x[..., :3]
    if min(x.shape[:2]) < 8:
        raise ValueError(f"image of {x.shape[1]} x {x.shape[0]} px is too small to judge")
    if x.dtype == np.uint8:
        return x.astype(np.float32)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ValueError("image holds NaN or infinite values")
        hi = float(x.max()) if x.size else 0.0
        # Floats are taken as 0..1 unless they plainly use the 0..255 range.
        return (np.clip(x, 0, 255) if hi > 1.5 else np.clip(x, 0, 1) * 255.0).astype(np.float32)
    if np.issubdtype(x.dtype, np.integer):
        return np.clip(x, 0, 255).astype(np.float32)
    raise ValueError(f"unsupported image dtype {x.dtype}")


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as float32 RGB (H, W, 3); raise :class:`ImageLoadError` naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"), np.float32)
    except FileNotFoundError:
        raise ImageLoadError(f"image file {str(path)!r} does not exist") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{str(path)!r} is not an image file (no image format recognised "
                             f"in its {len(data)} bytes)") from None
    except Exception as e:  # PIL raises many types for broken files
        raise ImageLoadError(f"cannot read image file {str(path)!r} (truncated or corrupt): "
                             f"{type(e).__name__}: {e}") from None


def _to_work(x: np.ndarray) -> np.ndarray:
    """Resize float RGB (H, W, 3) so the longer side is WORK_SIZE: float32 (h, w, 3).

    Goes through uint8 (one PIL call for the three channels; rounding to 1/255 is far below the
    thresholds). PIL's bilinear filter widens with the scale when shrinking, so it averages areas.
    """
    h, w = x.shape[:2]
    s = WORK_SIZE / max(h, w)
    nh, nw = max(int(round(h * s)), 1), max(int(round(w * s)), 1)
    if (nh, nw) == (h, w):
        return x
    im = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")
    return np.asarray(im.resize((nw, nh), Image.Resampling.BILINEAR), np.float32)


def _box3(x: np.ndarray) -> np.ndarray:
    """3 x 3 mean filter with edge padding, float32 (H, W, C)."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = p[:-2] + p[1:-1] + p[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


# ----------------------------------------------------------------------------------------------------
# Connected components and geometry


def label_components(mask: np.ndarray, connectivity: int = 4) -> tuple[np.ndarray, int]:
    """Label the connected components of a boolean mask.

    Works on horizontal runs with a union-find, so the Python work grows with the number of runs,
    not of pixels.

    Args:
        mask: bool array (H, W).
        connectivity: 4 or 8.

    Returns:
        ``(labels, n)``: int32 (H, W) with 0 = background and 1..n the components (in raster order of
        their first pixel), and the number of components n.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    m = np.asarray(mask, bool)
    H, W = m.shape
    d = np.diff(np.pad(m.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    sr, sc = np.nonzero(d == 1)
    _, ec = np.nonzero(d == -1)  # exclusive ends; same row-major order as the starts
    n = len(sr)
    if n == 0:
        return np.zeros((H, W), np.int32), 0
    parent = np.arange(n)

    def find(i):
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    slack = 1 if connectivity == 8 else 0
    bounds = np.searchsorted(sr, np.arange(H + 1))
    s_l, e_l = sc.tolist(), ec.tolist()
    for r in range(1, H):
        i, i1 = int(bounds[r - 1]), int(bounds[r])
        j, j1 = i1, int(bounds[r + 1])
        while i < i1 and j < j1:
            if s_l[i] < e_l[j] + slack and s_l[j] < e_l[i] + slack:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if e_l[i] < e_l[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)])
    uniq, run_label = np.unique(roots, return_inverse=True)
    run_label = run_label.astype(np.int64) + 1
    delta = np.zeros(H * W + 1, np.int64)
    np.add.at(delta, sr * W + sc, run_label)
    np.add.at(delta, sr * W + ec, -run_label)
    labels = np.cumsum(delta[:-1]).reshape(H, W).astype(np.int32)
    return labels, len(uniq)


def _hull_area_perimeter(mask: np.ndarray) -> tuple[float, float]:
    """Area and perimeter of the convex hull of the mask's pixel squares."""
    rows = np.nonzero(mask.any(1))[0]
    left = mask[rows].argmax(1)
    right = mask.shape[1] - mask[rows, ::-1].argmax(1)
    pts = np.concatenate([np.stack([left, rows], 1), np.stack([left, rows + 1], 1),
                          np.stack([right, rows], 1), np.stack([right, rows + 1], 1)]).astype(np.float64)
    pts = np.unique(pts, axis=0)  # sorted by x then y, as the monotone chain needs
    if len(pts) < 3:
        return 0.0, 0.0

    def half(points):
        out: list = []
        for p in points:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lst = pts.tolist()
    hull = np.asarray(half(lst)[:-1] + half(lst[::-1])[:-1])
    x, y = hull[:, 0], hull[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    perim = float(np.sqrt((np.diff(np.r_[x, x[:1]]) ** 2 + np.diff(np.r_[y, y[:1]]) ** 2)).sum())
    return area, perim


FEATURE_NAMES = ("extent", "solidity", "log_aspect", "top_share", "flip_iou", "corner_fill",
                 "hull_compactness")


def shape_features(mask: np.ndarray) -> np.ndarray:
    """Scale-free features of one object mask (bool (H, W), non-empty): float64 (7,).

    - extent: area / bounding box;
    - solidity: area / convex hull of the pixel squares;
    - log_aspect: log(box height / box width);
    - top_share: share of the area above the box's mid-line;
    - flip_iou: IoU of the mask with its upside-down flip inside the box (up-down symmetry);
    - corner_fill: mean fill of the four corner cells of a 3 x 3 grid over the box;
    - hull_compactness: hull perimeter^2 / (4 pi hull area), 1 for a disc.
    """
    ys, xs = np.nonzero(mask)
    area = float(len(ys))
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    bh, bw = box.shape
    hull_area, hull_perim = _hull_area_perimeter(box)
    rows = box.sum(1).astype(np.float64)
    centres = np.arange(bh) + 0.5
    # A row straddling the mid-line counts half: exact for odd heights.
    top = float((rows * np.clip(bh / 2 - (centres - 0.5), 0, 1)).sum()) / area
    flip = box[::-1]
    flip_iou = float((box & flip).sum()) / float((box | flip).sum())
    # Corner cells by fractional pixel weights, so the grid does not jump with the box size.
    wy = _third_weights(bh)
    wx = _third_weights(bw)
    b = box.astype(np.float64)
    corners = [wy[i] @ b @ wx[j] / (wy[i].sum() * wx[j].sum()) for i in (0, 2) for j in (0, 2)]
    return np.array([area / (bh * bw), area / max(hull_area, area), math.log(bh / bw), top, flip_iou,
                     float(np.mean(corners)), hull_perim ** 2 / (4 * math.pi * max(hull_area, 1e-9))])


def _third_weights(n: int) -> np.ndarray:
    """(3, n) weights: how much of each of n pixels falls in each third of [0, n]."""
    edges = np.arange(n + 1, dtype=np.float64)
    cuts = np.array([0.0, n / 3, 2 * n / 3, float(n)])
    lo = np.maximum(edges[None, :-1], cuts[:-1, None])
    hi = np.minimum(edges[None, 1:], cuts[1:, None])
    return np.clip(hi - lo, 0, None)


# ----------------------------------------------------------------------------------------------------
# Shape references


#: Scale of each shape feature in distances: roughly how much it wobbles for one shape across sizes,
#: blur and pixel noise, so that no feature decides alone on a difference a generator's edges exceed.
_FEATURE_SCALE = np.array([0.04, 0.03, 0.07, 0.03, 0.05, 0.05, 0.05])
_KNN = 3


@lru_cache(maxsize=1)
def shape_references() -> tuple[np.ndarray, np.ndarray]:
    """Reference features of the world's shapes: ``(features (N, F) float64, shape ids (N,) int)``.

    Measured on the world's own outlines drawn at the working resolution, over the sizes scenes use
    (from the smallest object of a 64 px image, ~20 px at the working resolution, to large ones), at
    sub-pixel offsets, and under blur from none to well beyond what a 64 px image blurred with
    sigma = 1 px becomes at the working resolution, and with pixel noise. Deterministic, computed once
    (~0.6 s).
    """
    feats, ids = [], []
    rng = np.random.default_rng(0)
    for k, shape in enumerate(SHAPE_NAMES):
        for diam in (20.0, 26.0, 34.0, 46.0, 64.0):
            # (sub-pixel offset, pixel noise as a fraction of the object's contrast)
            for off, noise in ((0.0, 0.0), (0.37, 0.0), (0.21, 0.12)):
                for sigma in (0.0, 1.2, 2.4, 3.4):
                    n = int(diam * 1.3) + 16
                    alpha, y0, x0 = shape_alpha(shape, n / 2 + off, n / 2 + off * 0.6, diam / 2, n, n)
                    canvas = np.zeros((n, n), np.float32)
                    canvas[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha
                    if sigma > 0:
                        canvas = gaussian_blur(canvas, sigma)
                    if noise > 0:
                        canvas = canvas + noise * rng.standard_normal(canvas.shape).astype(np.float32)
                    # The detector thresholds a 3 x 3 box-filtered image; do the same.
                    canvas = _box3(canvas[..., None])[..., 0]
                    feats.append(shape_features(canvas >= 0.5))
                    ids.append(k)
    return np.asarray(feats), np.asarray(ids)


def classify_shape(features: np.ndarray) -> tuple[str | None, float]:
    """Nearest shape by its references: ``(name or None, distance)``.

    The distance to a shape is the mean of the :data:`_KNN` smallest RMS distances to its references,
    each feature divided by :data:`_FEATURE_SCALE`. Nearest neighbours rather than one mean per shape,
    because a shape's features move along a curve as blur grows (a blurred star fattens towards a
    disc) and a single Gaussian per shape would blur the classes together.
    """
    refs, ids = shape_references()
    d = np.sqrt((((np.asarray(features)[None, :] - refs) / _FEATURE_SCALE) ** 2).mean(1))
    per = np.array([np.sort(d[ids == k])[:_KNN].mean() for k in range(len(SHAPE_NAMES))])
    k = int(per.argmin())
    return (SHAPE_NAMES[k] if per[k] <= SHAPE_REJECT else None), float(per[k])


# ----------------------------------------------------------------------------------------------------
# Detection


def _match_colors(pix: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blend-aware palette match of pixels (N, 3): (label (N,), coverage (N,), residual (N,))."""
    v = _PALETTE - bg[None, :]                                   # (K, 3) segment directions
    q = pix - bg[None, :]                                         # (N, 3)
    a = np.clip(q @ v.T / (v ** 2).sum(1)[None, :], 0.0, _ALPHA_MAX)  # (N, K) coverage per colour
    resid = np.linalg.norm(q[:, None, :] - a[..., None] * v[None], axis=2)  # (N, K)
    k = resid.argmin(1)
    idx = np.arange(len(pix))
    return k, a[idx, k], resid[idx, k]


def detect(image: Any) -> list[Detection]:
    """Detect the objects of an image (see the module docstring for the method).

    Args:
        image: anything :func:`to_rgb_array` accepts.

    Returns:
        Detections sorted by decreasing area.
    """
    x = _to_work(to_rgb_array(image))
    H, W = x.shape[:2]
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                             x[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    sm = _box3(x)
    fg = np.linalg.norm(sm - bg, axis=2) > FG_THRESHOLD
    labels, n = label_components(fg)
    min_area = MIN_AREA_FRAC * H * W
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    dets: list[Detection] = []
    for lab in np.nonzero((sizes >= min_area) & (sizes <= MAX_AREA_FRAC * H * W))[0]:
        if lab == 0:
            continue
        ys, xs = np.nonzero(labels == lab)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        k, a, resid = _match_colors(sm[ys, xs], bg)
        solid = a >= 0.5
        if solid.sum() < min_area:
            continue
        counts = np.bincount(k[solid], minlength=len(COLOR_NAMES))
        major = np.nonzero(counts >= SPLIT_SHARE * solid.sum())[0]
        if len(major) == 0:
            major = np.array([counts.argmax()])
        if len(major) > 1:
            # Touching objects of different colours: give every solid pixel to the closest major colour.
            sub = _PALETTE[major] - bg[None, :]
            q = sm[ys, xs] - bg[None, :]
            aa = np.clip(q @ sub.T / (sub ** 2).sum(1)[None, :], 0.0, _ALPHA_MAX)
            rr = np.linalg.norm(q[:, None, :] - aa[..., None] * sub[None], axis=2)
            k = major[rr.argmin(1)]
        else:
            k = np.full_like(k, major[0])
        for col in major:
            sel = solid & (k == col)
            if sel.sum() < min_area:
                continue
            local = np.zeros((y1 - y0, x1 - x0), bool)
            local[ys[sel] - y0, xs[sel] - x0] = True
            sub_labels, m = label_components(local) if len(major) > 1 else (local.astype(np.int32), 1)
            for sl in range(1, m + 1):
                part = sub_labels == sl
                if part.sum() < min_area:
                    continue
                dets.append(_describe(part, y0, x0, sm, bg, col, H, W))
    dets.sort(key=lambda d: -d.area)
    return dets


def _describe(part: np.ndarray, y0: int, x0: int, sm: np.ndarray, bg: np.ndarray, col: int,
              H: int, W: int) -> Detection:
    ys, xs = np.nonzero(part)
    pix = sm[ys + y0, xs + x0]
    # The object's colour: the median of its most contrasted half, i.e. away from blurred edges.
    contrast = np.linalg.norm(pix - bg, axis=1)
    core = pix[contrast >= np.median(contrast)]
    med = np.median(core, axis=0)
    kk, _, rr = _match_colors(med[None, :], bg)
    color = COLOR_NAMES[int(kk[0])] if rr[0] <= COLOR_REJECT else None
    feats = shape_features(part)
    shape, sdist = classify_shape(feats)
    by0, by1, bx0, bx1 = ys.min() + y0, ys.max() + 1 + y0, xs.min() + x0, xs.max() + 1 + x0
    bbox = (float(bx0 / W), float(by0 / H), float(bx1 / W), float(by1 / H))
    return Detection(shape=shape, color=color, bbox=bbox,
                     area=len(ys) / (H * W), shape_distance=sdist, color_distance=float(rr[0]),
                     features=tuple(float(f) for f in feats))


# ----------------------------------------------------------------------------------------------------
# Checking specs


def _plural(n: int, shape: str, color: str | None = None) -> str:
    return f"{n} {color + ' ' if color else ''}{shape}{'' if n == 1 else '(s)'}"


def first_failure(detections: Sequence[Detection], spec: PromptSpec | Mapping[str, Any]
                  ) -> tuple[str | None, str]:
    """The first criterion of ``spec`` that ``detections`` fail, GenEval's way.

    Returns:
        ``(kind, reason)``: ``kind`` one of :data:`FAILURE_KINDS`, or None when every criterion
        holds; ``reason`` says what was expected and found ("ok" when nothing failed).
    """
    spec = PromptSpec.from_metadata(spec)
    matched: list[list[Detection]] = []
    for req in spec.include:
        found = [d for d in detections if d.shape == req.shape]
        if len(found) < req.count:
            return "shape", f"expected {_plural(req.count, req.shape)}, found {len(found)}"
        if req.color is not None:
            found = [d for d in found if d.color == req.color]
            if len(found) < req.count:
                seen = sorted({str(d.color) for d in detections if d.shape == req.shape})
                return "colour", (f"expected {_plural(req.count, req.shape, req.color)}, found "
                                  f"{len(found)} ({req.shape} colours seen: {', '.join(seen)})")
        matched.append(found[:req.count])
    for i, req in enumerate(spec.include):
        if req.position is None:
            continue
        rel, j = req.position
        for a in matched[i]:
            for b in matched[j]:
                rels = relative_position(a.bbox, b.bbox)
                if rel not in rels:
                    return "position", (f"expected {req.shape} {rel} {spec.include[j].shape}, found "
                                        f"{', '.join(sorted(rels)) or 'no clear relation'}")
    for req in spec.exclude:
        found = [d for d in detections
                 if d.shape == req.shape and (req.color is None or d.color == req.color)]
        if len(found) >= req.count:
            return "extra", (f"expected fewer than {_plural(req.count, req.shape, req.color)}, "
                             f"found {len(found)}")
    return None, "ok"


def check_spec(detections: Sequence[Detection], spec: PromptSpec | Mapping[str, Any]) -> tuple[bool, str]:
    """Decide whether detections satisfy a spec, GenEval's way.

    Returns:
        ``(correct, reason)``; the reason names the first failed criterion ("ok" when correct).
    """
    kind, reason = first_failure(detections, spec)
    return kind is None, reason


def judge_detections(detections: Sequence[Detection], spec: PromptSpec | Mapping[str, Any]
                     ) -> JudgeResult:
    """The verdict on already detected objects (:func:`detect`) for ``spec``."""
    spec = PromptSpec.from_metadata(spec)
    kind, reason = first_failure(detections, spec)
    return JudgeResult(spec.tag, spec.prompt, kind is None, reason, spec.split, tuple(detections),
                       kind)


def judge_image(image: Any, spec: PromptSpec | Mapping[str, Any]) -> JudgeResult:
    """Detect the objects of ``image`` and check them against ``spec``."""
    return judge_detections(detect(image), spec)


def summarize(results: Iterable[JudgeResult]) -> dict[str, Any]:
    """Per-category accuracy and the overall score (GenEval: mean of the category accuracies).

    Returns:
        ``{"categories": {tag: {"accuracy", "correct", "images", "failures", "objects",
        "unrecognised"}}, "overall": float | None, "images": int}``;
        categories in :data:`GENEVAL_TAGS` order; ``failures`` counts the failed images by
        :data:`FAILURE_KINDS`, ``objects`` the detections and ``unrecognised`` those of no known
        shape. Held-out results are reported under ``"heldout"`` with the same layout and do
        not enter the main overall score.
    """
    groups: dict[str, dict[str, list[JudgeResult]]] = {}
    for r in results:
        group = groups.setdefault("heldout" if r.split == "heldout" else "main", {})
        group.setdefault(r.tag, []).append(r)

    def category(rs: list[JudgeResult]) -> dict[str, Any]:
        correct = [r.correct for r in rs]
        return {"accuracy": float(np.mean(correct)), "correct": int(sum(correct)), "images": len(rs),
                "failures": {k: sum(r.failure == k for r in rs) for k in FAILURE_KINDS},
                "objects": sum(len(r.detections) for r in rs),
                "unrecognised": sum(d.shape is None for r in rs for d in r.detections)}

    def table(g: dict[str, list[JudgeResult]]) -> dict[str, Any]:
        cats = {t: category(g[t]) for t in GENEVAL_TAGS if t in g}
        # None (JSON null, not NaN) when no image of this group was judged
        overall = float(np.mean([c["accuracy"] for c in cats.values()])) if cats else None
        return {"categories": cats, "overall": overall, "images": sum(c["images"] for c in cats.values())}

    out = table(groups.get("main", {}))
    if "heldout" in groups:
        out["heldout"] = table(groups["heldout"])
    return out

"""ShapeWorld: a procedural text-image world whose captions, questions and answers are known exactly.

A *scene* is 1-4 flat-coloured shapes on a dark, plain or lightly textured background. Everything about
a scene is drawn from ``np.random.default_rng([seed, index])``, so scene ``index`` of world ``seed`` is
the same on every machine, process and worker, and no file is ever needed.

Main entry points::

    world = ShapeWorld(size=128, seed=0)
    scene = world.sample(7)             # Scene: objects, background, relation
    scene.render()                      # PIL.Image (128 x 128, RGB)
    scene.captions                      # {"short": "a red circle and a blue square", ...}
    scene.questions()                   # [QA(question, answer, qtype, split), ...]
    world.scene_for_spec(spec)          # a scene that satisfies a GenEval-style PromptSpec
    world.flawed(scene)                 # one object drawn wrong, as a draft draws it (Flaw)

    ShapeWorldT2I(size=64, seed=0)      # IterableDataset of {"image", "caption", ...}
    ShapeWorldVQA(size=64, seed=0)      # IterableDataset of {"image", "conversations", ...}

Both datasets are infinite (or ``length``-long) streams sharded by ``(rank, world_size)`` and by the
``torch.utils.data`` worker, so every global index is produced exactly once per pass.

**Held-out split.** :data:`HELDOUT_PAIRS` lists colour-shape pairs that a world with ``holdout=True``
(the default) never renders in :meth:`ShapeWorld.sample`, as any object of any scene. The evaluation
prompts built from them (:mod:`harmon.eval.prompts`) test compositional generalisation.

**Prompt specs.** :class:`PromptSpec` is the structured form of a GenEval metadata line (``tag``,
``include``, ``exclude``, ``prompt``); the world renders it and the judge checks it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .shapes import (BACKGROUNDS, COLOR_NAMES, COLORS, MAX_OBJECTS, NUMBER_WORDS, OPPOSITE_RELATION,
                     RELATIONS, SHAPE_NAMES,
                     SHAPES, article, check_color, check_relation, check_shape, check_size, circumradius,
                     clear_relation, half_extent, make_background, shape_alpha)

# ----------------------------------------------------------------------------------------------------
# Constants

#: Colour-shape pairs never produced by a training world (``ShapeWorld(holdout=True).sample``). One per
#: colour; every shape appears at most twice, so each colour and each shape is still seen in training.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "semicircle"),
    ("orange", "star"),
    ("yellow", "square"),
    ("green", "diamond"),
    ("cyan", "triangle"),
    ("blue", "cross"),
    ("purple", "circle"),
    ("white", "star"),
)

#: GenEval's six categories (metadata ``tag``).
GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position",
                                 "color_attr")

#: Scene kinds of the training stream and their default probabilities.
DEFAULT_KIND_WEIGHTS: dict[str, float] = {"single": 0.25, "pair": 0.35, "count": 0.25, "multi": 0.15}

#: Caption styles of the text-to-image stream and their default probabilities. "position" styles fall
#: back to "short"/"plain" for scenes without a clear relation.
DEFAULT_STYLE_WEIGHTS: dict[str, float] = {"short": 0.35, "plain": 0.2, "position": 0.15,
                                           "position_plain": 0.1, "detailed": 0.2}

#: Question types of the VQA stream and their default probabilities.
DEFAULT_QTYPE_WEIGHTS: dict[str, float] = {"pope": 0.35, "count": 0.15, "color": 0.12, "shape": 0.12,
                                           "position": 0.14, "caption": 0.12}

#: How an object of a flawed scene (:meth:`ShapeWorld.flawed`) is drawn wrong, after the faults of a
#: generator's drafts: ``blend``, its colour turns into another across it; ``fuse``, it is merged
#: with a copy of itself shifted by about half its size, a blob of no shape.
FLAW_KINDS: tuple[str, ...] = ("blend", "fuse")

#: A blended object turns into a colour at least this far (RGB distance) from its own: red into
#: blue, not into orange, whose blend a reader cannot tell from a jittered red.
FLAW_MIN_COLOR_DISTANCE = 150.0

#: LLaVA-1.5's instruction for short answers, appended to every non-caption question.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."

#: Other wordings of the VQA stream's questions, used by a world with ``paraphrase`` on: the pattern
#: of a question's first line (the short-answer instruction after it is kept) and templates filled
#: with its groups. The first pattern that matches wins, so "objects" comes before any other noun.
QUESTION_WORDINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"Is there (.+) in the image\?",
     ("Is there {0} in the picture?", "Does the image contain {0}?", "Can you see {0}?",
      "Is there {0} here?")),
    (r"How many objects are there in the image\?",
     ("How many shapes are there?", "How many shapes are in the image?",
      "How many objects can you see?", "Count the objects.")),
    (r"How many (\w+) are there in the image\?",
     ("How many {0} are there?", "How many {0} can you see?", "How many {0} are in the picture?",
      "Count the {0}.")),
    (r"What color is the (\w+)\?",
     ("What is the color of the {0}?", "Which color is the {0}?", "What colour is the {0}?",
      "What color does the {0} have?")),
    (r"What shape is the (\w+) object\?",
     ("What is the shape of the {0} object?", "Which shape is {0}?", "What shape is {0}?",
      "What is the {0} shape?")),
    (r"Is the (.+?) (to the left of|to the right of|above|below) the (.+)\?",
     ("Is the {0} {1} the {2} in the image?", "Is the {0} placed {1} the {2}?")),
    (r"Describe the image briefly\.",
     ("What is in the image?", "Briefly describe the image.", "Describe this picture briefly.")),
    (r"Describe the image in detail\.",
     ("Describe this image in detail.", "Give a detailed description of the image.")),
)

#: Open questions a world with ``paraphrase`` on also asks of single-object scenes, with the object
#: attribute that answers each.
SINGLE_OBJECT_QUESTIONS: dict[str, str] = {"What shape is in the image?": "shape",
                                           "What color is the object?": "color"}

#: Probability that a world with ``paraphrase`` on asks a question in another wording: the stream's
#: own wording stays the most frequent, so the evaluation questions keep their accuracy.
PARAPHRASE_PROB = 0.5


def question_wordings(question: str,
                      wordings: Sequence[tuple[str, Sequence[str]]] = QUESTION_WORDINGS) -> list[str]:
    """Other wordings of a ShapeWorld question (by default :data:`QUESTION_WORDINGS`; any table of
    the same form), each with the same answer; the short-answer instruction on its second line,
    if any, is kept. ``[]`` when the question has no other wording."""
    head, sep, tail = question.partition("\n")
    for pattern, templates in wordings:
        m = re.fullmatch(pattern, head)
        if m:
            return [t.format(*m.groups()) + sep + tail for t in templates]
    return []

#: Object diameter range (fraction of the image side) by number of objects in the scene: large enough
#: that every shape is classifiable at 64 px (>= ~13 px across), small enough that four fit.
DIAMETER_RANGE: dict[int, tuple[float, float]] = {1: (0.32, 0.5), 2: (0.25, 0.38), 3: (0.22, 0.30),
                                                  4: (0.20, 0.26)}
_MARGIN = 0.03   # objects' boxes stay this far (fraction of the side) inside the image
_GAP = 0.05      # and their bounding circles this far apart, so no object hides or touches another
_REGIONS = (("top left", "at the top left"), ("top", "at the top"), ("top right", "at the top right"),
            ("left", "on the left"), ("center", "in the center"), ("right", "on the right"),
            ("bottom left", "at the bottom left"), ("bottom", "at the bottom"),
            ("bottom right", "at the bottom right"))


def region_of(x: float, y: float) -> str:
    """Name of the cell of a 3 x 3 grid holding the normalised point (x, y): 'top left', ..."""
    col, row = min(int(x * 3), 2), min(int(y * 3), 2)
    return _REGIONS[row * 3 + col][0]


def _check_weights(weights: Mapping[str, float], allowed: Sequence[str], what: str) -> dict[str, float]:
    unknown = sorted(set(weights) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; expected a subset of {list(allowed)}")
    w = {k: float(v) for k, v in weights.items()}
    if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"{what} weights must be >= 0 with a positive sum, got {w}")
    return w


def _check_flaw_prob(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"flaw_prob must be a number in [0, 1], got {p!r}")
    return float(p)


def _choice(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _join(parts: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    parts = list(parts)
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def noun_phrase(shape: str, color: str | None = None, count: int = 1) -> str:
    """'a circle', 'an orange star', 'three red squares'."""
    words = ([color] if color else []) + [shape if count == 1 else SHAPES[shape]]
    head = article(words[0]) if count == 1 else NUMBER_WORDS[count]
    return f"{head} {' '.join(words)}"


_COUNT_WORDS = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items() if n > 0}}
_PLURALS = {p: s for s, p in SHAPES.items()}


def _phrase_objects(phrase: str) -> tuple[str, str | None, int] | None:
    """'three red squares' -> ("square", "red", 3); None outside the caption grammar."""
    words = phrase.split()
    if len(words) not in (2, 3) or words[0] not in _COUNT_WORDS:
        return None
    n, color, noun = _COUNT_WORDS[words[0]], (words[1] if len(words) == 3 else None), words[-1]
    shape = noun if n == 1 else _PLURALS.get(noun)
    if shape not in SHAPES or (color is not None and color not in COLORS):
        return None
    return shape, color, n


def parse_prompt(text: str) -> tuple[list[tuple[str, str | None, int]], str | None] | None:
    """A prompt of the caption grammar as ``(objects, relation)``: ``objects`` are ``(shape,
    colour or None, count)`` per noun phrase, ``relation`` the phrase between two of them ("to the
    left of") or None. None where ``text`` is not such a prompt: one to three noun phrases joined by
    "and" (or ", "), or two by a relation, at most six of one shape in all.

        >>> parse_prompt("a red circle to the left of two squares")
        ([('circle', 'red', 1), ('square', None, 2)], 'to the left of')
    """
    if not isinstance(text, str):
        return None
    t = " ".join(text.lower().strip().rstrip(".").split())
    parts, relation = None, None
    for phrase in RELATIONS.values():
        halves = t.split(f" {phrase} ")
        if len(halves) == 2:
            parts, relation = halves, phrase
            break
    if parts is None:
        parts = [p for chunk in t.split(" and ") for p in chunk.split(", ")]
    objects = [_phrase_objects(p) for p in parts]
    if not 1 <= len(objects) <= 3 or any(o is None for o in objects):
        return None
    if max(_shape_counts(objects).values()) > max(NUMBER_WORDS):
        return None
    return objects, relation


def _shape_counts(objects: Sequence[tuple[str, str | None, int]]) -> dict[str, int]:
    """{shape: how many the noun phrases ask for in all}, in the order shapes are first named."""
    counts: dict[str, int] = {}
    for shape, _, n in objects:
        counts[shape] = counts.get(shape, 0) + n
    return counts


def prompt_questions(text: str) -> list[tuple[str, str]] | None:
    """The questions an image that shows ``text`` answers, with their answers, in the wordings of
    :meth:`Scene.questions` (without the answer instruction); None where ``text`` is not a prompt
    of the caption grammar (:func:`parse_prompt`).

    Asked: how many of each named shape there are, whether each coloured one is there, and the
    colour of each shape named once. Relations are not asked: what a relation question gets
    from a model is not yet evidence (the shipped model answers them at chance).

        >>> prompt_questions("three circles")
        [('How many circles are there in the image?', 'three')]
    """
    parsed = parse_prompt(text)
    if parsed is None:
        return None
    objects = parsed[0]
    counts = _shape_counts(objects)
    checks = [(f"How many {SHAPES[s]} are there in the image?", NUMBER_WORDS[n])
              for s, n in counts.items()]
    for shape, color, n in objects:
        if color is not None:
            checks.append((f"Is there {noun_phrase(shape, color)} in the image?", "yes"))
            if counts[shape] == 1:
                checks.append((f"What color is the {shape}?", color))
    return checks


def trained_colors(shape: str) -> list[str]:
    """The colours a training world (``ShapeWorld(holdout=True)``, the default) draws ``shape`` in:
    every colour but those of :data:`HELDOUT_PAIRS`."""
    return [c for c in COLOR_NAMES if (c, check_shape(shape)) not in HELDOUT_PAIRS]


def complete_prompt(text: str, choose: Callable[[Sequence[str]], str]) -> str:
    """``text`` with a colour named for every noun phrase of it that names none, as the training
    captions name them: "three circles" -> "three yellow circles" (one colour for a counted
    phrase), "a circle to the left of a square" -> "a red circle to the left of a blue square".

    The colours are ``choose(options)``'s, one call per phrase without a colour, in the order of
    the phrases; the options are :func:`trained_colors` of the phrase's shape less the colours
    the prompt already names, or all of them when that leaves none. ``text`` comes back as it is
    when it is not a prompt of the caption grammar (:func:`parse_prompt`) or names every colour.
    Why: the shipped model draws a prompt without colours worse than one with them (an object's
    colour left free turns into another across it), the way an image generator given a bare
    prompt draws worse than one given a detailed one; naming the free colours is prompt
    upsampling by the world's grammar.
    """
    parsed = parse_prompt(text)
    if parsed is None or all(color is not None for _, color, _ in parsed[0]):
        return text
    objects, relation = parsed
    used = [color for _, color, _ in objects if color is not None]
    phrases = []
    for shape, color, n in objects:
        if color is None:
            options = [c for c in trained_colors(shape) if c not in used] or trained_colors(shape)
            color = choose(options)
            if color not in options:
                raise ValueError(f"choose returned {color!r}, not one of the options {options}")
            used.append(color)
        phrases.append(noun_phrase(shape, color, n))
    return f" {relation} ".join(phrases) if relation else _join(phrases)


# ----------------------------------------------------------------------------------------------------
# Prompt specs (GenEval metadata)


@dataclass(frozen=True)
class ObjectReq:
    """One ``include``/``exclude`` entry of a GenEval metadata line.

    Attributes:
        shape: shape name (GenEval's ``class``).
        count: in ``include``, at least this many; in ``exclude``, fewer than this many.
        color: required colour of ``count`` of them, or None.
        position: ``(relation, index)``: one of them must be ``relation`` (e.g. ``"left of"``) some
            object matching ``include[index]``; or None.
    """

    shape: str
    count: int = 1
    color: str | None = None
    position: tuple[str, int] | None = None

    def __post_init__(self):
        check_shape(self.shape)
        if self.color is not None:
            check_color(self.color)
        if not isinstance(self.count, (int, np.integer)) or isinstance(self.count, bool) or self.count < 1:
            raise ValueError(f"object count must be an int >= 1, got {self.count!r} for {self.shape!r}")
        if self.position is not None:
            if len(self.position) != 2:
                raise ValueError(f"position must be [relation, include index], got {self.position!r}")
            rel, idx = self.position
            check_relation(rel)
            if not isinstance(idx, (int, np.integer)) or idx < 0:
                raise ValueError(f"position index must be an int >= 0, got {idx!r}")
            object.__setattr__(self, "position", (rel, int(idx)))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"class": self.shape, "count": int(self.count)}
        if self.color is not None:
            d["color"] = self.color
        if self.position is not None:
            d["position"] = [self.position[0], self.position[1]]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "object") -> "ObjectReq":
        if not isinstance(d, Mapping) or "class" not in d:
            raise ValueError(f"{where}: expected a dict with a 'class' key, got {d!r}")
        unknown = sorted(set(d) - {"class", "count", "color", "position"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected class, count, color, position")
        pos = d.get("position")
        return cls(shape=d["class"], count=d.get("count", 1), color=d.get("color"),
                   position=tuple(pos) if pos is not None else None)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt with the structured facts the judge checks (one GenEval metadata line).

    Attributes:
        tag: GenEval category, one of :data:`GENEVAL_TAGS`.
        prompt: the text given to the generator.
        include: objects that must be present (see :class:`ObjectReq`).
        exclude: objects that must not be present ``count`` or more times.
        split: ``"test"`` (in distribution) or ``"heldout"`` (uses :data:`HELDOUT_PAIRS`).
    """

    tag: str
    prompt: str
    include: tuple[ObjectReq, ...]
    exclude: tuple[ObjectReq, ...] = ()
    split: str = "test"

    def __post_init__(self):
        if self.tag not in GENEVAL_TAGS:
            raise ValueError(f"unknown tag {self.tag!r}; expected one of {list(GENEVAL_TAGS)}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not self.include:
            raise ValueError(f"spec {self.prompt!r} has an empty include list")
        if self.split not in ("test", "heldout"):
            raise ValueError(f"spec {self.prompt!r}: unknown split {self.split!r}; expected 'test' or "
                             "'heldout'")
        for i, req in enumerate(self.include):
            if req.position is not None and not (0 <= req.position[1] < len(self.include)
                                                 and req.position[1] != i):
                raise ValueError(f"spec {self.prompt!r}: include[{i}] position index {req.position[1]} "
                                 f"must name another include entry (0..{len(self.include) - 1})")
        for i in range(len(self.include)):
            # follow the references from i; coming back to i is a cycle no layout can start from
            seen, k = [i], self.include[i].position
            while k is not None:
                j = k[1]
                if j in seen:
                    chain = " -> ".join(f"include[{m}]" for m in seen[seen.index(j):] + [j])
                    raise ValueError(f"spec {self.prompt!r}: position references form a cycle "
                                     f"({chain}); each position must refer to an object whose own "
                                     "position does not lead back to it")
                seen.append(j)
                k = self.include[j].position

    @property
    def n_objects(self) -> int:
        """Objects a scene satisfying the spec needs at least."""
        return sum(r.count for r in self.include)

    def check_feasible(self) -> None:
        """Raise ValueError if no ShapeWorld scene can satisfy the spec."""
        if self.n_objects > MAX_OBJECTS:
            raise ValueError(f"spec {self.prompt!r} needs {self.n_objects} objects but a ShapeWorld scene "
                             f"holds at most {MAX_OBJECTS} (at any size, 64 px included)")
        for ex in self.exclude:
            have = sum(r.count for r in self.include
                       if r.shape == ex.shape and (ex.color is None or r.color == ex.color))
            if have >= ex.count:
                raise ValueError(f"spec {self.prompt!r} is contradictory: it includes {have} {ex.shape} "
                                 f"but excludes {ex.count} or more")

    def to_metadata(self) -> dict[str, Any]:
        """GenEval metadata dict: ``tag``, ``include``, ``exclude`` (if any), ``prompt``, ``split``."""
        d: dict[str, Any] = {"tag": self.tag, "include": [r.to_dict() for r in self.include]}
        if self.exclude:
            d["exclude"] = [r.to_dict() for r in self.exclude]
        d["prompt"] = self.prompt
        d["split"] = self.split
        return d

    @classmethod
    def from_metadata(cls, d: Mapping[str, Any]) -> "PromptSpec":
        """Parse a GenEval metadata dict (extra keys such as GenEval's own are ignored)."""
        if isinstance(d, PromptSpec):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"expected a metadata dict, got {type(d).__name__}")
        for key in ("tag", "include", "prompt"):
            if key not in d:
                raise ValueError(f"metadata {dict(d)!r} lacks the key {key!r}")
        inc = tuple(ObjectReq.from_dict(x, f"include[{i}]") for i, x in enumerate(d["include"]))
        exc = tuple(ObjectReq.from_dict(x, f"exclude[{i}]") for i, x in enumerate(d.get("exclude", [])))
        return cls(tag=d["tag"], prompt=str(d["prompt"]), include=inc, exclude=exc,
                   split=str(d.get("split", "test")))


# ----------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene.

    Attributes:
        shape, color: vocabulary names.
        x, y: centre of the bounding box, normalised to [0, 1] (y downwards).
        diameter: scale, as a fraction of the image side (the unit outline is scaled by diameter / 2).
        rgb: the drawn colour (the named colour with a small jitter).
    """

    shape: str
    color: str
    x: float
    y: float
    diameter: float
    rgb: tuple[int, int, int]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` normalised."""
        hx, hy = half_extent(self.shape)
        r = self.diameter / 2
        return (self.x - hx * r, self.y - hy * r, self.x + hx * r, self.y + hy * r)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def region(self) -> str:
        """Cell of a 3 x 3 grid holding the centre: 'top left', 'center', 'bottom', ..."""
        return region_of(self.x, self.y)

    @property
    def size_word(self) -> str:
        """'small', 'large' or '' (medium sizes are not named)."""
        if self.diameter < 0.25:
            return "small"
        if self.diameter >= 0.36:
            return "large"
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "x": round(self.x, 5), "y": round(self.y, 5),
                "diameter": round(self.diameter, 5), "rgb": list(self.rgb),
                "bbox": [round(v, 5) for v in self.bbox]}


@dataclass(frozen=True)
class Flaw:
    """An object drawn wrong, as a generator's draft may draw it: not one shape of one colour.

    A scene's questions and captions leave flawed objects out (they are not a shape the world's
    vocabulary names), so a reader trained on flawed scenes learns not to count them.

    Attributes:
        obj: the object as it should have been drawn.
        kind: one of :data:`FLAW_KINDS`.
        angle: direction (radians, image axes) of the colour change or of the shift.
        amount: ``blend``: where the colour changes, in radii from the centre along ``angle``;
            ``fuse``: the distance between the two copies, in radii.
        other_rgb: ``blend``: the colour it turns into.
    """

    obj: ShapeObject
    kind: str
    angle: float
    amount: float
    other_rgb: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self):
        if self.kind not in FLAW_KINDS:
            raise ValueError(f"unknown flaw kind {self.kind!r}; expected one of {list(FLAW_KINDS)}")

    def draw(self, img: np.ndarray) -> None:
        """Paint the flawed object onto ``img`` ((S, S, 3) float32, modified in place)."""
        s = img.shape[0]
        o, (c, n) = self.obj, (math.cos(self.angle), math.sin(self.angle))
        r = o.diameter * s / 2
        if self.kind == "fuse":
            d = self.amount * r / 2
            for sign in (-1, 1):
                _paint(img, o.shape, o.x * s + sign * c * d, o.y * s + sign * n * d, r, o.rgb)
            return
        alpha, y0, x0 = shape_alpha(o.shape, o.x * s, o.y * s, r, s, s)
        if alpha.size == 0:
            return
        h, w = alpha.shape
        yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32) + 0.5
        along = ((xx - o.x * s) * c + (yy - o.y * s) * n) / r
        # a soft edge about a third of a radius wide, as the drafts' colour changes are
        mix = 1 / (1 + np.exp(-(along - self.amount) / 0.12))
        rgb = ((1 - mix)[..., None] * np.asarray(o.rgb, np.float32)
               + mix[..., None] * np.asarray(self.other_rgb, np.float32))
        patch = img[y0:y0 + h, x0:x0 + w]
        patch += alpha[..., None] * (rgb - patch)

    def to_dict(self) -> dict[str, Any]:
        return {"object": self.obj.to_dict(), "kind": self.kind, "angle": round(self.angle, 5),
                "amount": round(self.amount, 5), "other_rgb": list(self.other_rgb)}


def _rgb_distance(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(COLORS[a], COLORS[b])))


def _paint(img: np.ndarray, shape: str, cx: float, cy: float, radius: float,
           rgb: tuple[int, int, int]) -> None:
    """Composite one flat-coloured shape (centre and radius in pixels) onto ``img`` in place."""
    alpha, y0, x0 = shape_alpha(shape, cx, cy, radius, img.shape[0], img.shape[1])
    if alpha.size == 0:
        return
    h, w = alpha.shape
    patch = img[y0:y0 + h, x0:x0 + w]
    patch += alpha[..., None] * (np.asarray(rgb, np.float32) - patch)


@dataclass(frozen=True)
class QA:
    """One question with its exact answer.

    Attributes:
        question: the question text (with :data:`SHORT_ANSWER_PROMPT` where a short answer is wanted).
        answer: the answer, lower case ('yes', 'no', 'red', 'circle', 'three', 'left of'...).
        qtype: 'pope', 'count', 'color', 'shape', 'position' or 'caption'.
        split: for POPE, the negative sampling: 'random', 'popular' or 'adversarial' (or 'flaw':
            a flawed object named, see :class:`Flaw`); else None.
    """

    question: str
    answer: str
    qtype: str
    split: str | None = None

    def conversation(self) -> list[dict[str, str]]:
        """LLaVA conversation: ``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]``."""
        return [{"from": "human", "value": "<image>\n" + self.question},
                {"from": "gpt", "value": self.answer}]


def _short(q: str) -> str:
    return f"{q}\n{SHORT_ANSWER_PROMPT}"


@dataclass(frozen=True)
class Scene:
    """A fully specified image: objects, background, and the facts its text is built from.

    Attributes:
        size: image side in pixels.
        objects: the shapes, in caption order.
        background: background name (a key of ``BACKGROUNDS``) and ``background_rgb`` its drawn colour.
        texture: amplitude of the background texture in RGB units (0 = plain).
        noise_seed: seed of the texture noise (so rendering needs no generator state).
        kind: 'single', 'pair', 'count', 'multi' (training kinds) or 'spec' (from a PromptSpec).
        relation: ``(i, relation, j)``: objects[i] is ``relation`` objects[j], clearly; or None.
        index, seed: where the scene comes from (``-1`` when built from a spec).
        flaws: objects drawn wrong (:class:`Flaw`), in the image but in no caption or answer.
    """

    size: int
    objects: tuple[ShapeObject, ...]
    background: str
    background_rgb: tuple[int, int, int]
    texture: float
    noise_seed: int
    kind: str
    relation: tuple[int, str, int] | None = None
    index: int = -1
    seed: int = 0
    flaws: tuple[Flaw, ...] = ()

    # -- pixels --------------------------------------------------------------------------------------

    def render_array(self) -> np.ndarray:
        """The image as uint8 (size, size, 3)."""
        s = self.size
        img = make_background(s, self.background_rgb, self.texture, np.random.default_rng(self.noise_seed))
        for o in self.objects:
            _paint(img, o.shape, o.x * s, o.y * s, o.diameter * s / 2, o.rgb)
        for f in self.flaws:
            f.draw(img)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def render(self) -> Image.Image:
        """The image as an RGB PIL image (size x size)."""
        return Image.fromarray(self.render_array(), "RGB")

    # -- text ----------------------------------------------------------------------------------------

    def _grouped(self, with_color: bool) -> str:
        groups: dict[tuple, int] = {}
        for o in self.objects:
            key = (o.color if with_color else None, o.shape)
            groups[key] = groups.get(key, 0) + 1
        return _join([noun_phrase(s, c, n) for (c, s), n in groups.items()])

    @cached_property
    def captions(self) -> dict[str, str]:
        """Captions by style.

        - ``short``: every object with its colour, identical ones counted ("two red circles and a
          blue star"); for a single object this is a GenEval *colors* prompt, for two a *color_attr*.
        - ``plain``: the same without colours (GenEval *single_object*, *two_object*, *counting*).
        - ``position`` / ``position_plain``: "a red circle to the left of a blue square" (with or
          without colours), only when the scene has a clear relation.
        - ``detailed``: every object with size, colour and place, and the background.
        """
        caps = {"short": self._grouped(True), "plain": self._grouped(False)}
        if self.relation is not None:
            i, rel, j = self.relation
            a, b = self.objects[i], self.objects[j]
            caps["position"] = (f"{noun_phrase(a.shape, a.color)} {RELATIONS[rel]} "
                                f"{noun_phrase(b.shape, b.color)}")
            caps["position_plain"] = f"{noun_phrase(a.shape)} {RELATIONS[rel]} {noun_phrase(b.shape)}"
        parts = []
        for o in sorted(self.objects, key=lambda o: (min(int(o.y * 3), 2), o.x)):
            words = " ".join(w for w in (o.size_word, o.color, o.shape) if w)
            parts.append(f"{article(words)} {words} {dict(_REGIONS)[o.region]}")
        look = "textured" if self.texture > 0 else "plain"
        caps["detailed"] = f"{_join(parts)} on {article(look)} {look} {self.background} background"
        return caps

    def caption(self, style: str = "short") -> str:
        """Caption of ``style``; position styles fall back to short/plain without a relation."""
        caps = self.captions
        if style in caps:
            return caps[style]
        if style in ("position", "position_plain"):
            return caps["short" if style == "position" else "plain"]
        raise ValueError(f"unknown caption style {style!r}; expected one of {list(DEFAULT_STYLE_WEIGHTS)}")

    # -- questions -----------------------------------------------------------------------------------

    def _reference(self, k: int) -> str | None:
        """Shortest unambiguous name of objects[k] ('circle', 'red circle'), or None."""
        o = self.objects[k]
        if sum(p.shape == o.shape for p in self.objects) == 1:
            return o.shape
        if sum(p.shape == o.shape and p.color == o.color for p in self.objects) == 1:
            return o.name
        return None

    def questions(self) -> list[QA]:
        """Every question this scene answers exactly; deterministic per scene.

        - ``pope``: balanced yes/no existence questions, one yes and one no per split.
          ``random``: an absent shape ("Is there a star in the image?").
          ``popular``: an absent colour-shape pair whose colour is present in the image.
          ``adversarial``: a colour-shape pair whose shape *and* colour are both present but on
          different objects (a binding error), else a present shape in an absent colour.
          The "yes" of the colour splits names a present colour-shape pair.
          (POPE's "popular" means frequent in the data set; all our shapes are equally frequent, so
          we take popular = "a colour seen in this image" instead.)
        - ``count``: "How many circles are there in the image?" (present shapes, one absent shape
          answered "zero", and all objects).
        - ``color`` / ``shape``: for shapes / colours that occur exactly once.
        - ``position``: "Is the circle to the left of the square?", for each clear relation between two
          unambiguously named objects, with the true relation (yes) and its opposite (no).
        - ``caption``: the detailed and short captions.
        """
        rng = np.random.default_rng([self.noise_seed, 17])
        objs = self.objects
        present_shapes = sorted({o.shape for o in objs}, key=SHAPE_NAMES.index)
        absent_shapes = [s for s in SHAPE_NAMES if s not in present_shapes]
        present_colors = sorted({o.color for o in objs}, key=COLOR_NAMES.index)
        present_pairs = sorted({(o.color, o.shape) for o in objs})
        qa: list[QA] = []

        def exists(shape, color=None):
            return _short(f"Is there {noun_phrase(shape, color)} in the image?")

        # POPE random: shape level.
        if absent_shapes:
            qa.append(QA(exists(present_shapes[rng.integers(len(present_shapes))]), "yes", "pope", "random"))
            qa.append(QA(exists(absent_shapes[rng.integers(len(absent_shapes))]), "no", "pope", "random"))
        # Negatives never name a held-out pair: training text must not mention them either.
        excluded = set(present_pairs) | set(HELDOUT_PAIRS)
        # POPE popular: an absent pair with a present colour.
        pop = [(c, s) for c in present_colors for s in SHAPE_NAMES if (c, s) not in excluded]
        # POPE adversarial: swap bindings between present objects, else recolour a present shape.
        adv = [(c, s) for c in present_colors for s in present_shapes if (c, s) not in excluded]
        if not adv:
            adv = [(c, s) for c in COLOR_NAMES for s in present_shapes if (c, s) not in excluded]
        for split, negatives in (("popular", pop), ("adversarial", adv)):
            if negatives:
                c, s = present_pairs[rng.integers(len(present_pairs))]
                qa.append(QA(exists(s, c), "yes", "pope", split))
                c, s = negatives[rng.integers(len(negatives))]
                qa.append(QA(exists(s, c), "no", "pope", split))

        def how_many(shape):
            return _short(f"How many {SHAPES[shape]} are there in the image?")

        for s in present_shapes:
            qa.append(QA(how_many(s), NUMBER_WORDS[sum(o.shape == s for o in objs)], "count"))
        if absent_shapes:
            qa.append(QA(how_many(absent_shapes[rng.integers(len(absent_shapes))]), "zero", "count"))
        qa.append(QA(_short("How many objects are there in the image?"), NUMBER_WORDS[len(objs)], "count"))

        for s in present_shapes:
            same = [o for o in objs if o.shape == s]
            if len(same) == 1:
                qa.append(QA(_short(f"What color is the {s}?"), same[0].color, "color"))
        for c in present_colors:
            same = [o for o in objs if o.color == c]
            if len(same) == 1:
                qa.append(QA(_short(f"What shape is the {c} object?"), same[0].shape, "shape"))

        for i in range(len(objs)):
            for j in range(len(objs)):
                ri, rj = self._reference(i), self._reference(j)
                if i == j or ri is None or rj is None:
                    continue
                rel = clear_relation(objs[i].bbox, objs[j].bbox)
                if rel is None:
                    continue
                qa.append(QA(_short(f"Is the {ri} {RELATIONS[rel]} the {rj}?"), "yes", "position"))
                opp = RELATIONS[OPPOSITE_RELATION[rel]]
                qa.append(QA(_short(f"Is the {ri} {opp} the {rj}?"), "no", "position"))

        if self.flaws:
            # A blob is still an object, and its colour may be another object's: only what the
            # flaw leaves exact is asked, and what it is about (its shape, its colour) is added.
            return [q for q in qa if q.qtype in ("pope", "count", "color", "position")
                    and not q.question.startswith("How many objects")] + self._flaw_questions(qa)
        qa.append(QA("Describe the image in detail.", self.captions["detailed"], "caption"))
        qa.append(QA("Describe the image briefly.", self.captions["short"], "caption"))
        return qa

    def _flaw_questions(self, asked: Sequence[QA]) -> list[QA]:
        """What a flawed object is asked: its shape counted and it named with its colour, both
        answered from the objects drawn right ('zero', 'no' where none is): POPE split 'flaw'."""
        seen = {q.question for q in asked}
        qa = []
        for f in self.flaws:
            s, c = f.obj.shape, f.obj.color
            n = sum(o.shape == s for o in self.objects)
            there = any(o.shape == s and o.color == c for o in self.objects)
            for q in (QA(_short(f"How many {SHAPES[s]} are there in the image?"), NUMBER_WORDS[n],
                         "count"),
                      QA(_short(f"Is there {noun_phrase(s, c)} in the image?"),
                         "yes" if there else "no", "pope", "flaw")):
                if q.question not in seen:
                    seen.add(q.question)
                    qa.append(q)
        return qa

    def specs(self) -> list[PromptSpec]:
        """GenEval-style specs this scene satisfies, for its natural categories (used to test the judge)."""
        groups: dict[tuple[str, str], int] = {}
        for o in self.objects:
            groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
        specs = []
        shape_counts: dict[str, int] = {}
        for o in self.objects:
            shape_counts[o.shape] = shape_counts.get(o.shape, 0) + 1
        if len(self.objects) == 1:
            o = self.objects[0]
            specs.append(PromptSpec("single_object", noun_phrase(o.shape), (ObjectReq(o.shape),)))
            specs.append(PromptSpec("colors", noun_phrase(o.shape, o.color),
                                    (ObjectReq(o.shape, 1, o.color),)))
        if len(shape_counts) == 1:
            s, n = next(iter(shape_counts.items()))
            if n >= 2:
                specs.append(PromptSpec("counting", noun_phrase(s, None, n), (ObjectReq(s, n),),
                                        (ObjectReq(s, n + 1),)))
        if len(self.objects) == 2 and len(shape_counts) == 2:
            a, b = self.objects
            specs.append(PromptSpec("two_object", self.captions["plain"],
                                    (ObjectReq(a.shape), ObjectReq(b.shape))))
            specs.append(PromptSpec("color_attr", self.captions["short"],
                                    (ObjectReq(a.shape, 1, a.color), ObjectReq(b.shape, 1, b.color))))
        if self.relation is not None and len(shape_counts) == len(self.objects):
            i, rel, j = self.relation
            a, b = self.objects[i], self.objects[j]
            specs.append(PromptSpec("position", self.captions["position_plain"],
                                    (ObjectReq(b.shape), ObjectReq(a.shape, position=(rel, 0)))))
        return specs

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (objects, background, relation, captions)."""
        return {"index": self.index, "seed": self.seed, "size": self.size, "kind": self.kind,
                "objects": [o.to_dict() for o in self.objects], "background": self.background,
                "background_rgb": list(self.background_rgb), "texture": round(self.texture, 4),
                "relation": list(self.relation) if self.relation else None, "captions": self.captions,
                **({"flaws": [f.to_dict() for f in self.flaws]} if self.flaws else {})}


# ----------------------------------------------------------------------------------------------------
# The world


@dataclass
class ShapeWorld:
    """A deterministic generator of scenes.

    Args:
        size: image side in pixels, 64..512.
        seed: world seed; scene ``index`` uses ``np.random.default_rng([seed, index])``.
        holdout: never render a pair of :data:`HELDOUT_PAIRS` in :meth:`sample` (training worlds).
        kind_weights: probabilities of the scene kinds ('single', 'pair', 'count', 'multi').
        textured_prob: probability of a textured (rather than plain) background.
        texture_range: range of the texture amplitude, RGB units (low-contrast by design).
        color_jitter: per-channel jitter of object colours, RGB units.
        relation_prob: probability that a two-object scene is laid out with a clear relation.
        pair_order: lay out every two-object scene with a clear relation and list its objects in
            reading order along the relation's axis (the left or the upper one first), so "a red
            circle and a blue square" always has the circle on the left or on top. The position
            captions are unchanged in meaning. A curriculum knob: with it, which object goes where
            is a function of the caption, and a generator that sees nothing yet need not guess it.
        and_horizontal: in the text-to-image stream, caption a pair laid out one above the other by
            its relation only ("a red circle above a blue square"; a plain, short or detailed
            style drawn becomes the position style with or without colours), so "and" names
            side-by-side pairs only and the words "above" and "below" alone call for the vertical
            axis. A curriculum knob against drawing a relation on the wrong axis; the scenes are
            unchanged.
        paraphrase: in the VQA stream, ask half of the questions in another wording
            (:func:`question_wordings`), and give single-object scenes the open questions "What
            shape is in the image?" and "What color is the object?". A knob against answers that
            hang on one phrasing; scenes and captions are unchanged.
        flaw_prob: in the VQA stream, the probability that a scene of two or more objects has one
            of them drawn wrong (:meth:`flawed`): its colours blended or it fused into a blob, and
            left out of every answer. A knob that teaches a reader the faults of a generator's
            drafts, so that the model's own reading can pick between them.
    """

    size: int = 128
    seed: int = 0
    holdout: bool = True
    kind_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))
    textured_prob: float = 0.5
    texture_range: tuple[float, float] = (3.0, 9.0)
    color_jitter: int = 12
    relation_prob: float = 0.75
    pair_order: bool = False
    and_horizontal: bool = False
    paraphrase: bool = False
    flaw_prob: float = 0.0

    def __post_init__(self):
        self.size = check_size(self.size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"world seed must be an int >= 0, got {self.seed!r}")
        self.kind_weights = _check_weights(self.kind_weights, list(DEFAULT_KIND_WEIGHTS), "scene kind")
        if not 0 <= self.textured_prob <= 1 or not 0 <= self.relation_prob <= 1:
            raise ValueError("textured_prob and relation_prob must lie in [0, 1]")
        if not isinstance(self.pair_order, bool):
            raise ValueError(f"pair_order must be true or false, got {self.pair_order!r}")
        if not isinstance(self.and_horizontal, bool):
            raise ValueError(f"and_horizontal must be true or false, got {self.and_horizontal!r}")
        if not isinstance(self.paraphrase, bool):
            raise ValueError(f"paraphrase must be true or false, got {self.paraphrase!r}")
        _check_flaw_prob(self.flaw_prob)
        if not 0 <= self.color_jitter <= 40:
            raise ValueError(f"color_jitter {self.color_jitter} must lie in 0..40 (larger jitter "
                             "would let neighbouring named colours overlap)")
        held = set(HELDOUT_PAIRS) if self.holdout else set()
        self._pairs = [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES if (c, s) not in held]
        self._colors_of = {s: [c for c in COLOR_NAMES if (c, s) not in held] for s in SHAPE_NAMES}

    @property
    def allowed_pairs(self) -> list[tuple[str, str]]:
        """Colour-shape pairs :meth:`sample` may produce."""
        return list(self._pairs)

    # -- sampling ------------------------------------------------------------------------------------

    def _color(self, rng, shape: str) -> str:
        colors = self._colors_of[shape]
        return colors[rng.integers(len(colors))]

    def _rgb(self, rng, color: str) -> tuple[int, int, int]:
        base = np.asarray(COLORS[color])
        jit = rng.integers(-self.color_jitter, self.color_jitter + 1, 3) if self.color_jitter else 0
        return tuple(int(v) for v in np.clip(base + jit, 0, 255))

    def _finish(self, rng, items, constraints, kind, index, reading_order=False) -> Scene:
        """Lay out ``items`` [(shape, color)], draw the background and build the scene."""
        xs, ys, ds = _layout(rng, [s for s, _ in items], constraints)
        objs = [ShapeObject(s, c, x, y, d, self._rgb(rng, c)) for (s, c), x, y, d in zip(items, xs, ys, ds)]
        relation = None
        if constraints:
            i, rel, j = constraints[0]
            relation = (i, rel, j)
        if reading_order:
            objs.sort(key=lambda o: (min(int(o.y * 3), 2), o.x))
        bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        bg_rgb = tuple(int(v) for v in np.clip(np.asarray(BACKGROUNDS[bg]) + rng.integers(-5, 6, 3), 0, 255))
        texture = float(rng.uniform(*self.texture_range)) if rng.random() < self.textured_prob else 0.0
        noise_seed = int(rng.integers(2 ** 62))
        if relation is None and len(objs) == 2:
            # A freely placed pair can still happen to be clearly related; say so when it is.
            rel = clear_relation(objs[0].bbox, objs[1].bbox)
            relation = (0, rel, 1) if rel else None
        if self.pair_order and kind == "pair" and relation[1] in ("right of", "below"):
            objs, relation = objs[::-1], (1, relation[1], 0)
        return Scene(self.size, tuple(objs), bg, bg_rgb, texture, noise_seed, kind, relation, index,
                     self.seed)

    def sample(self, index: int) -> Scene:
        """Scene ``index`` of this world (deterministic in ``(seed, index)``)."""
        if index < 0:
            raise ValueError(f"scene index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        kind = _choice(rng, self.kind_weights)
        constraints: list[tuple[int, str, int]] = []
        if kind == "single":
            items = [self._pairs[rng.integers(len(self._pairs))][::-1]]
        elif kind == "pair":
            s1, s2 = rng.choice(len(SHAPE_NAMES), 2, replace=False)
            items = [(SHAPE_NAMES[s], self._color(rng, SHAPE_NAMES[s])) for s in (s1, s2)]
            if rng.random() < self.relation_prob or self.pair_order:
                constraints = [(0, list(RELATIONS)[rng.integers(4)], 1)]
        elif kind == "count":
            n = int(rng.integers(2, MAX_OBJECTS + 1))
            shape = SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]
            if rng.random() < 0.5:
                c = self._color(rng, shape)
                items = [(shape, c)] * n
            else:
                items = [(shape, self._color(rng, shape)) for _ in range(n)]
        else:  # multi
            n = int(rng.integers(3, MAX_OBJECTS + 1))
            items = [self._pairs[rng.integers(len(self._pairs))][::-1] for _ in range(n)]
        return self._finish(rng, items, constraints, kind, int(index),
                            reading_order=kind in ("count", "multi"))

    __getitem__ = sample

    def flawed(self, scene: Scene) -> Scene:
        """``scene`` with one object drawn wrong (a :class:`Flaw`), deterministic in the scene.

        One object (of a scene of two or more; scenes of one are returned as they are) is moved
        from ``objects`` to ``flaws``: with equal odds its colour blends into another named colour
        across it (a colour far from its own, :data:`FLAW_MIN_COLOR_DISTANCE`, the change 0.25
        radii or less from its centre, so both cover a good part of it) or it is fused with a copy
        of itself 0.8-1.2 radii away. Flaws are drawn plain to see: a flaw a reader cannot see
        would teach it to undercount. The relation is dropped, since it may name the flawed
        object.
        """
        if len(scene.objects) < 2:
            return scene
        rng = np.random.default_rng([scene.noise_seed, 23])
        k = int(rng.integers(len(scene.objects)))
        obj = scene.objects[k]
        kind = FLAW_KINDS[int(rng.integers(len(FLAW_KINDS)))]
        angle = float(rng.uniform(0, 2 * math.pi))
        if kind == "blend":
            others = [c for c in COLOR_NAMES if _rgb_distance(c, obj.color) > FLAW_MIN_COLOR_DISTANCE]
            flaw = Flaw(obj, kind, angle, float(rng.uniform(-0.25, 0.25)),
                        self._rgb(rng, others[int(rng.integers(len(others)))]))
        else:
            flaw = Flaw(obj, kind, angle, float(rng.uniform(0.8, 1.2)))
        rest = scene.objects[:k] + scene.objects[k + 1:]
        return replace(scene, objects=rest, relation=None, flaws=scene.flaws + (flaw,))

    def vqa_scene(self, index: int) -> Scene:
        """Scene ``index`` as the VQA stream shows it: flawed (:meth:`flawed`) with probability
        :attr:`flaw_prob` (generator ``[seed, index, 4]``), else :meth:`sample`'s."""
        scene = self.sample(index)
        if self.flaw_prob and np.random.default_rng([self.seed, int(index), 4]).random() < self.flaw_prob:
            return self.flawed(scene)
        return scene

    def scene_for_spec(self, spec: PromptSpec | Mapping[str, Any], index: int = 0) -> Scene:
        """A scene satisfying ``spec`` exactly (reference images for evaluation).

        Objects get the spec's colours, or random colours (avoiding held-out pairs when ``holdout``)
        where the spec names none. Deterministic in ``(seed, spec prompt, index)``. Held-out pairs the
        spec asks for are drawn: reference images are not training data.

        Raises:
            ValueError: unknown names, or a spec no scene can satisfy (e.g. more than 4 objects).
        """
        spec = PromptSpec.from_metadata(spec)
        spec.check_feasible()
        key = [ord(ch) for ch in spec.prompt][:64]
        rng = np.random.default_rng([self.seed, 0x5EC, int(index), len(spec.prompt), *key])
        items: list[tuple[str, str]] = []
        first: list[int] = []
        for req in spec.include:
            first.append(len(items))
            for _ in range(req.count):
                items.append((req.shape, req.color or self._color(rng, req.shape)))
        # the judge wants every object of a group in the relation to every object of the other
        constraints = [(first[i] + a, req.position[0], first[req.position[1]] + b)
                       for i, req in enumerate(spec.include) if req.position is not None
                       for a in range(req.count) for b in range(spec.include[req.position[1]].count)]
        return self._finish(rng, items, constraints, "spec", -1)

    # -- stream items --------------------------------------------------------------------------------

    def caption_for(self, index: int, scene: Scene | None = None,
                    style_weights: Mapping[str, float] | None = None) -> tuple[str, str]:
        """``(caption, style)`` the text-to-image stream pairs with scene ``index``.

        The style is drawn from ``style_weights`` (default :data:`DEFAULT_STYLE_WEIGHTS`) with a
        generator of its own (``[seed, index, 1]``), so the scene does not depend on it; position
        styles fall back to short/plain for scenes without a clear relation.
        """
        w = _check_weights(style_weights or DEFAULT_STYLE_WEIGHTS, list(DEFAULT_STYLE_WEIGHTS),
                           "caption style")
        scene = scene if scene is not None else self.sample(index)
        style = _choice(np.random.default_rng([self.seed, int(index), 1]), w)
        if style.startswith("position") and scene.relation is None:
            style = "short" if style == "position" else "plain"
        if (self.and_horizontal and scene.kind == "pair" and scene.relation is not None
                and scene.relation[1] in ("above", "below") and not style.startswith("position")):
            style = "position_plain" if style == "plain" else "position"
        return scene.caption(style), style

    def conversation_for(self, index: int, scene: Scene | None = None,
                         qtype_weights: Mapping[str, float] | None = None, turns: int = 1
                         ) -> tuple[list[dict[str, str]], list[str]]:
        """``(conversations, qtypes)`` the VQA stream pairs with scene ``index``.

        ``conversations`` is a LLaVA list alternating human/gpt turns, ``<image>`` in the first human
        turn. Each turn's question type is drawn from ``qtype_weights`` (default
        :data:`DEFAULT_QTYPE_WEIGHTS`) among the types the scene has (generator ``[seed, index, 2]``),
        then one question of that type; turns do not repeat a question. With :attr:`paraphrase`,
        the wording is drawn from generator ``[seed, index, 3]``, so the questions drawn stay those
        of the plain stream except on single-object scenes, whose pool gains two open questions.
        """
        w = _check_weights(qtype_weights or DEFAULT_QTYPE_WEIGHTS, list(DEFAULT_QTYPE_WEIGHTS),
                           "question type")
        if turns < 1:
            raise ValueError(f"turns must be >= 1, got {turns}")
        scene = scene if scene is not None else self.vqa_scene(index)
        rng = np.random.default_rng([self.seed, int(index), 2])
        pool = scene.questions()
        if self.paraphrase and len(scene.objects) == 1 and not scene.flaws:
            pool += [QA(_short(q), getattr(scene.objects[0], attr), attr)
                     for q, attr in SINGLE_OBJECT_QUESTIONS.items()]
        wording_rng = np.random.default_rng([self.seed, int(index), 3])
        conv: list[dict[str, str]] = []
        qtypes: list[str] = []
        for t in range(turns):
            by_type: dict[str, list[QA]] = {}
            for q in pool:
                by_type.setdefault(q.qtype, []).append(q)
            avail = {k: v for k, v in w.items() if k in by_type and v > 0}
            if not avail:
                break
            qt = _choice(rng, avail)
            q = by_type[qt][rng.integers(len(by_type[qt]))]
            pool = [p for p in pool if p is not q]
            question = q.question
            if self.paraphrase and wording_rng.random() < PARAPHRASE_PROB:
                others = question_wordings(question)
                question = others[wording_rng.integers(len(others))] if others else question
            conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + question},
                     {"from": "gpt", "value": q.answer}]
            qtypes.append(qt)
        return conv, qtypes

    def t2i_item(self, index: int, style_weights: Mapping[str, float] | None = None,
                 as_numpy: bool = False) -> dict[str, Any]:
        """``{"index", "image", "caption", "style"}`` for scene ``index`` (see :meth:`caption_for`).

        ``image`` is a PIL RGB image, or uint8 (H, W, 3) with ``as_numpy``.
        """
        scene = self.sample(index)
        caption, style = self.caption_for(index, scene, style_weights)
        image = scene.render_array() if as_numpy else scene.render()
        return {"index": int(index), "image": image, "caption": caption, "style": style}

    def vqa_item(self, index: int, qtype_weights: Mapping[str, float] | None = None, turns: int = 1,
                 as_numpy: bool = False) -> dict[str, Any]:
        """``{"index", "image", "conversations", "qtypes"}`` for scene ``index`` (see
        :meth:`conversation_for`)."""
        scene = self.vqa_scene(index)
        conv, qtypes = self.conversation_for(index, scene, qtype_weights, turns)
        image = scene.render_array() if as_numpy else scene.render()
        return {"index": int(index), "image": image, "conversations": conv, "qtypes": qtypes}


# ----------------------------------------------------------------------------------------------------
# Layout


def _layout(rng: np.random.Generator, shapes: Sequence[str],
            constraints: Sequence[tuple[int, str, int]]) -> tuple[list[float], list[float], list[float]]:
    """Centres and diameters (normalised) for ``shapes``, non-overlapping, meeting ``constraints``.

    Each constraint ``(i, rel, j)`` makes object i clearly ``rel`` object j (see ``clear_relation``);
    an object may have several. Objects are placed one by one by rejection, every object after the
    objects it refers to; a stuck layout restarts, and repeated failures shrink the objects a little
    (it never came to that in practice, but it bounds the loop).
    """
    n = len(shapes)
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {n}")
    lo, hi = DIAMETER_RANGE[n]
    cons: dict[int, list[tuple[str, int]]] = {}
    for i, rel, j in constraints:
        cons.setdefault(i, []).append((rel, j))
    order = _placement_order(n, cons)
    for shrink in range(6):
        scale = 0.9 ** shrink
        ds = [float(rng.uniform(lo, hi)) * scale for _ in range(n)]
        for _restart in range(40):
            pos: dict[int, tuple[float, float]] = {}
            ok = True
            for k in order:
                r = ds[k] / 2
                hx, hy = (h * r for h in half_extent(shapes[k]))
                placed = False
                for _try in range(60):
                    if k in cons:
                        rel, j = cons[k][_try % len(cons[k])]  # propose next to one target
                        # Offset within 25 degrees of the relation's axis, far enough not to overlap.
                        ang = math.radians(float(rng.uniform(-25, 25)))
                        dist = (circumradius(shapes[k]) * r + circumradius(shapes[j]) * ds[j] / 2 + _GAP
                                + float(rng.uniform(0, 0.2)))
                        along, across = dist * math.cos(ang), dist * math.sin(ang)
                        jx, jy = pos[j]
                        x, y = {"left of": (jx - along, jy + across), "right of": (jx + along, jy + across),
                                "above": (jx + across, jy - along), "below": (jx + across, jy + along)}[rel]
                    else:
                        x = float(rng.uniform(_MARGIN + hx, 1 - _MARGIN - hx))
                        y = float(rng.uniform(_MARGIN + hy, 1 - _MARGIN - hy))
                    if not (_MARGIN + hx <= x <= 1 - _MARGIN - hx and _MARGIN + hy <= y <= 1 - _MARGIN - hy):
                        continue
                    if any(math.hypot(x - px, y - py) < circumradius(shapes[k]) * r
                           + circumradius(shapes[m]) * ds[m] / 2 + _GAP for m, (px, py) in pos.items()):
                        continue
                    if k in cons:
                        a = ShapeObject(shapes[k], "red", x, y, ds[k], (0, 0, 0)).bbox
                        if any(clear_relation(a, ShapeObject(shapes[j], "red", *pos[j], ds[j],
                                                             (0, 0, 0)).bbox) != rel
                               for rel, j in cons[k]):
                            continue
                    pos[k] = (x, y)
                    placed = True
                    break
                if not placed:
                    ok = False
                    break
            if ok:
                return [pos[k][0] for k in range(n)], [pos[k][1] for k in range(n)], ds
    raise RuntimeError(f"could not lay out {list(shapes)} with constraints {list(constraints)}")


def _placement_order(n: int, cons: Mapping[int, Sequence[tuple[str, int]]]) -> list[int]:
    """Objects 0..n-1 in an order that places every object after the objects it refers to."""
    order: list[int] = []
    pending = list(range(n))
    while pending:
        ready = [k for k in pending if all(j in order for _, j in cons.get(k, ()))]
        if not ready:
            raise ValueError(f"position constraints {dict(cons)} form a cycle")
        order += ready
        pending = [k for k in pending if k not in ready]
    return order


# ----------------------------------------------------------------------------------------------------
# Streams


class _Stream:
    """Shared sharding logic of the two iterable datasets."""

    def __init__(self, world: ShapeWorld | None, size: int, seed: int, rank: int | None,
                 world_size: int | None, start: int, length: int | None, as_numpy: bool, world_kwargs):
        self.world = world if world is not None else ShapeWorld(size=size, seed=seed, **world_kwargs)
        if rank is None or world_size is None:
            rank, world_size = _dist_rank()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        if start < 0 or (length is not None and length < 0):
            raise ValueError(f"start ({start}) and length ({length}) must be >= 0")
        self.rank, self.world_size = int(rank), int(world_size)
        self.start, self.length, self.as_numpy = int(start), length, as_numpy

    def indices(self) -> Iterator[int]:
        """Global scene indices of this rank and worker.

        Rank ``r`` of ``W`` owns ``start + r, start + r + W, start + r + 2W, ...`` (whatever the number
        of workers, so a rank's data do not change with it), and worker ``w`` of ``K`` takes every
        ``K``-th of those from the ``w``-th on. All ranks and workers together produce each index of
        ``[start, start + length)`` exactly once, in increasing order within a worker.
        """
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.world_size * nw
        i = self.start + self.rank + self.world_size * wid
        end = None if self.length is None else self.start + self.length
        while end is None or i < end:
            yield i
            i += step


def _dist_rank() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - torch without distributed
        pass
    return 0, 1


class ShapeWorldT2I(IterableDataset, _Stream):
    """Text-to-image stream: dicts ``{"index", "image", "caption", "style"}``.

    Args:
        size, seed: of the world (ignored when ``world`` is given).
        rank, world_size: data-parallel shard; None reads torch.distributed (or 0, 1).
        start: first global index (to resume), length: number of global indices (None = infinite).
        style_weights: caption style probabilities (default :data:`DEFAULT_STYLE_WEIGHTS`).
        as_numpy: yield uint8 (H, W, 3) arrays instead of PIL images.
        world: a configured :class:`ShapeWorld` to draw from.
        **world_kwargs: other :class:`ShapeWorld` arguments (holdout, kind_weights, ...).
    """

    def __init__(self, size: int = 128, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 start: int = 0, length: int | None = None, style_weights: Mapping[str, float] | None = None,
                 as_numpy: bool = False, world: ShapeWorld | None = None, **world_kwargs):
        _Stream.__init__(self, world, size, seed, rank, world_size, start, length, as_numpy, world_kwargs)
        self.style_weights = _check_weights(style_weights or DEFAULT_STYLE_WEIGHTS,
                                            list(DEFAULT_STYLE_WEIGHTS), "caption style")

    def __iter__(self):
        for i in self.indices():
            yield self.world.t2i_item(i, self.style_weights, self.as_numpy)


class ShapeWorldVQA(IterableDataset, _Stream):
    """Understanding stream: dicts ``{"index", "image", "conversations", "qtypes"}``.

    Arguments as :class:`ShapeWorldT2I`, plus ``qtype_weights`` (default
    :data:`DEFAULT_QTYPE_WEIGHTS`) and ``turns`` (question-answer turns per conversation).
    """

    def __init__(self, size: int = 128, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 start: int = 0, length: int | None = None, qtype_weights: Mapping[str, float] | None = None,
                 turns: int = 1, as_numpy: bool = False, world: ShapeWorld | None = None, **world_kwargs):
        _Stream.__init__(self, world, size, seed, rank, world_size, start, length, as_numpy, world_kwargs)
        self.qtype_weights = _check_weights(qtype_weights or DEFAULT_QTYPE_WEIGHTS,
                                            list(DEFAULT_QTYPE_WEIGHTS), "question type")
        if turns < 1:
            raise ValueError(f"turns must be >= 1, got {turns}")
        self.turns = turns

    def __iter__(self):
        for i in self.indices():
            yield self.world.vqa_item(i, self.qtype_weights, self.turns, self.as_numpy)

"""Evaluation prompt sets of ShapeWorld, GenEval-style metadata files and folders.

The prompt sets are fixed lists built from the vocabulary (not sampled from the training stream), one
per GenEval category, with the prompt forms the training captions use:

============== ========================================= ==============================
category       prompt                                    in the ``test`` split
============== ========================================= ==============================
single_object  "a circle"                                every shape (7)
two_object     "a circle and a square"                   every pair of shapes (21)
counting       "three circles" (2..4, exactly)           every shape x count (21)
colors         "a red circle"                            every trained colour-shape pair (48)
position       "a circle to the left of a square"        every ordered shape pair, 2 relations (84)
color_attr     "a red circle and a blue square"          84 drawn pairs of trained pairs
============== ========================================= ==============================

The ``heldout`` split uses :data:`~harmon.data.shapeworld.HELDOUT_PAIRS`, colour-shape pairs a training
world never renders: ``colors`` for each of them (8) and ``color_attr`` pairing each with trained pairs
(24). A generator trained on ShapeWorld has seen every colour and every shape of these prompts, never
the combination.

Folder layout (GenEval's)::

    DIR/00000/metadata.jsonl      one line: the metadata dict (tag, include, exclude, prompt, split)
    DIR/00000/samples/00000.png   several samples per prompt
    DIR/00000/samples/00001.png
    DIR/00001/...
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from harmon.data.shapes import COLOR_NAMES, RELATIONS, SHAPE_NAMES
from harmon.data.shapeworld import (GENEVAL_TAGS, HELDOUT_PAIRS, ObjectReq, PromptSpec, ShapeWorld,
                                    noun_phrase)

SPLITS = ("test", "heldout")
_PROMPT_SEED = 20240611  # fixes the drawn subsets; changing it changes the benchmark


def _single_object() -> list[PromptSpec]:
    return [PromptSpec("single_object", noun_phrase(s), (ObjectReq(s),)) for s in SHAPE_NAMES]


def _two_object() -> list[PromptSpec]:
    rng = np.random.default_rng([_PROMPT_SEED, 1])
    out = []
    for a, b in itertools.combinations(SHAPE_NAMES, 2):
        if rng.random() < 0.5:  # both orders appear in the set
            a, b = b, a
        out.append(PromptSpec("two_object", f"{noun_phrase(a)} and {noun_phrase(b)}",
                              (ObjectReq(a), ObjectReq(b))))
    return out


def _counting() -> list[PromptSpec]:
    return [PromptSpec("counting", noun_phrase(s, None, n), (ObjectReq(s, n),), (ObjectReq(s, n + 1),))
            for s in SHAPE_NAMES for n in (2, 3, 4)]


def _colors(pairs: Iterable[tuple[str, str]], split: str) -> list[PromptSpec]:
    return [PromptSpec("colors", noun_phrase(s, c), (ObjectReq(s, 1, c),), split=split) for c, s in pairs]


def _position() -> list[PromptSpec]:
    rels = list(RELATIONS)
    out = []
    for k, (a, b) in enumerate(itertools.permutations(SHAPE_NAMES, 2)):
        for rel in (rels[k % 4], rels[(k + 1) % 4]):
            # GenEval's layout: include[0] is the reference, include[1] is placed relative to it.
            out.append(PromptSpec("position", f"{noun_phrase(a)} {RELATIONS[rel]} {noun_phrase(b)}",
                                  (ObjectReq(b), ObjectReq(a, position=(rel, 0)))))
    return out


def _color_attr_spec(p: tuple[str, str], q: tuple[str, str], split: str) -> PromptSpec:
    (c1, s1), (c2, s2) = p, q
    return PromptSpec("color_attr", f"{noun_phrase(s1, c1)} and {noun_phrase(s2, c2)}",
                      (ObjectReq(s1, 1, c1), ObjectReq(s2, 1, c2)), split=split)


def _trained_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES if (c, s) not in HELDOUT_PAIRS]


def _color_attr(n: int = 84) -> list[PromptSpec]:
    rng = np.random.default_rng([_PROMPT_SEED, 2])
    pairs = _trained_pairs()
    cands = [(p, q) for p, q in itertools.permutations(pairs, 2) if p[0] != q[0] and p[1] != q[1]]
    pick = rng.choice(len(cands), n, replace=False)
    return [_color_attr_spec(*cands[i], "test") for i in sorted(pick)]


def _heldout_color_attr(per_pair: int = 3) -> list[PromptSpec]:
    rng = np.random.default_rng([_PROMPT_SEED, 3])
    trained = _trained_pairs()
    out = []
    for h in HELDOUT_PAIRS:
        cands = [q for q in trained if q[0] != h[0] and q[1] != h[1]]
        for j, i in enumerate(rng.choice(len(cands), per_pair, replace=False)):
            p, q = (h, cands[i]) if j % 2 == 0 else (cands[i], h)
            out.append(_color_attr_spec(p, q, "heldout"))
    return out


def eval_prompts(split: str = "test", categories: Sequence[str] | None = None) -> list[PromptSpec]:
    """The evaluation prompt set.

    Args:
        split: ``"test"`` (in distribution), ``"heldout"`` (held-out colour-shape pairs) or ``"all"``
            (test then heldout).
        categories: keep only these GenEval tags (default all).

    Returns:
        Specs in a fixed order (category order of :data:`GENEVAL_TAGS`).
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}; expected one of {[*SPLITS, 'all']}")
    if categories is not None:
        bad = sorted(set(categories) - set(GENEVAL_TAGS))
        if bad:
            raise ValueError(f"unknown categories {bad}; expected a subset of {list(GENEVAL_TAGS)}")
    specs: list[PromptSpec] = []
    if split in ("test", "all"):
        specs += (_single_object() + _two_object() + _counting() + _colors(_trained_pairs(), "test")
                  + _position() + _color_attr())
    if split in ("heldout", "all"):
        specs += _colors(HELDOUT_PAIRS, "heldout") + _heldout_color_attr()
    if categories is not None:
        specs = [s for s in specs if s.tag in categories]
    return specs


# ----------------------------------------------------------------------------------------------------
# Files


def write_metadata_jsonl(path: str | Path, specs: Iterable[PromptSpec]) -> int:
    """Write one GenEval metadata line per spec; return the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w") as f:
        for s in specs:
            f.write(json.dumps(s.to_metadata()) + "\n")
            n += 1
    return n


def read_metadata_jsonl(path: str | Path) -> list[PromptSpec]:
    """Read GenEval metadata lines (blank lines skipped); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metadata file {str(path)!r} does not exist")
    specs = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            spec = PromptSpec.from_metadata(json.loads(line))
            spec.check_feasible()  # an impossible spec would quietly score 0
            specs.append(spec)
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise ValueError(f"{path}:{ln}: bad metadata line: {e}") from None
    return specs


def write_geneval_folder(out_dir: str | Path, specs: Sequence[PromptSpec],
                         images_for: Callable[[int, PromptSpec], Sequence[Any]]) -> Path:
    """Write images in GenEval's layout.

    Args:
        out_dir: destination folder (created).
        specs: the prompts, in order; prompt ``i`` goes to ``out_dir/{i:05d}``.
        images_for: ``(i, spec) -> images`` (PIL images or uint8 (H, W, 3) arrays), the samples of
            prompt ``i``; e.g. a generator's outputs.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    for i, spec in enumerate(specs):
        d = out / f"{i:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        (d / "metadata.jsonl").write_text(json.dumps(spec.to_metadata()) + "\n")
        for j, im in enumerate(images_for(i, spec)):
            im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8), "RGB")
            im.save(d / "samples" / f"{j:05d}.png")
    return out


def reference_images(world: ShapeWorld, spec: PromptSpec, samples: int) -> list[np.ndarray]:
    """``samples`` true scenes of ``spec`` drawn by ``world``, each (H, W, 3) uint8: what a
    perfect generator would draw for the prompt."""
    return [world.scene_for_spec(spec, j).render_array() for j in range(samples)]


def write_reference_folder(out_dir: str | Path, specs: Sequence[PromptSpec] | None = None, samples: int = 4,
                           size: int = 128, seed: int = 0,
                           transform: Callable[[np.ndarray, int, int], np.ndarray] | None = None) -> Path:
    """Write ShapeWorld's own images for the prompts in GenEval's layout (a perfect generator).

    Args:
        specs: prompts (default: ``eval_prompts("all")``).
        samples: images per prompt.
        size: image side in pixels.
        seed: world seed of the reference scenes.
        transform: optional ``(uint8 image, prompt index, sample index) -> uint8 image`` applied
            before saving (e.g. blur and noise to imitate a generator).
    """
    specs = list(eval_prompts("all") if specs is None else specs)
    world = ShapeWorld(size=size, seed=seed)

    def images(i: int, spec: PromptSpec):
        for j, im in enumerate(reference_images(world, spec, samples)):
            yield transform(im, i, j) if transform is not None else im

    return write_geneval_folder(out_dir, specs, images)


def read_geneval_folder(root: str | Path) -> list[tuple[Path, PromptSpec, list[Path]]]:
    """List a GenEval-layout folder: ``[(prompt dir, spec, sorted sample image paths)]``.

    Raises:
        ValueError: the folder does not exist, holds no prompt folders, or a prompt folder lacks a
            readable ``metadata.jsonl``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a folder")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "metadata.jsonl").exists())
    if not dirs:
        raise ValueError(f"{str(root)!r} holds no prompt folders (expected DIR/00000/metadata.jsonl and "
                         "DIR/00000/samples/*.png, GenEval's layout)")
    out = []
    for d in dirs:
        specs = read_metadata_jsonl(d / "metadata.jsonl")
        if len(specs) != 1:
            raise ValueError(f"{d / 'metadata.jsonl'}: expected exactly one metadata line, "
                             f"found {len(specs)}")
        sd = d / "samples"
        imgs = sorted(p for p in sd.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) \
            if sd.is_dir() else []
        out.append((d, specs[0], imgs))
    return out

"""How generated images of two-object prompts fail: what is drawn instead, and where it goes.

Reads the images `harmon eval model --out DIR` wrote (DIR/images/NNNNN/metadata.jsonl and
samples/*.png) and judges the two-object, position and colour-attribution images of the test
split again. Every image that misses an asked shape is filed under what it holds instead:

- ``copied``: one asked shape, drawn twice or more (the second object copies the first);
- ``other``: one asked shape, and the other object of another shape or of none;
- ``neither``: no asked shape.

For position images in which both asked shapes were drawn, the relation between them: the asked
one (``right``), its opposite (``opposite``), or only one on the other axis (``other axis``).
The judge's ``relative_position`` decides, as it does when it scores.

    harmon eval model --samples 1 --out runs/eval_shipped
    python benchmarks/failure_modes.py runs/eval_shipped
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from harmon.data.shapes import OPPOSITE_RELATION, relative_position
from harmon.data.shapeworld import PromptSpec
from harmon.eval.judge import Detection, detect, first_failure, load_image
from harmon.eval.prompts import read_geneval_folder

HERE = Path(__file__).resolve().parent
TAGS = ("two_object", "position", "color_attr")


def missing_shape_kind(detections: Sequence[Detection], spec: PromptSpec) -> str:
    """What an image that misses an asked shape holds instead: "copied", "other" or "neither"."""
    shapes = [d.shape for d in detections]
    present = {r.shape for r in spec.include if r.shape in shapes}
    if not present:
        return "neither"
    if len(present) == 1 and shapes.count(next(iter(present))) >= 2:
        return "copied"
    return "other"


def relation_kind(detections: Sequence[Detection], spec: PromptSpec) -> str | None:
    """For a position prompt with both shapes drawn: "right", "opposite" or "other axis" (the
    first detection of each shape, as the judge matches them); None when a shape is missing."""
    placed = next((i for i, r in enumerate(spec.include) if r.position is not None), None)
    if placed is None:
        return None
    rel, ref = spec.include[placed].position
    a = next((d for d in detections if d.shape == spec.include[placed].shape), None)
    b = next((d for d in detections if d.shape == spec.include[ref].shape), None)
    if a is None or b is None:
        return None
    found = relative_position(a.bbox, b.bbox)
    if rel in found:
        return "right"
    return "opposite" if OPPOSITE_RELATION[rel] in found else "other axis"


def count(eval_dir: str | Path) -> dict[str, dict[str, int]]:
    """Tally every sample of the test split's two-object prompts under ``eval_dir``.

    Returns:
        ``{tag: {"images", "judged right", "missing shape", "copied", "other", "neither",
        "both shapes drawn", "relation right", "relation opposite", "relation other axis"}}``
        (a key absent when its count is 0), plus ``"all"`` summed over the tags.
    """
    root = Path(eval_dir) / "images"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: pass the --out folder of "
                                "`harmon eval model`")
    out: dict[str, Counter] = {t: Counter() for t in TAGS}
    for _, spec, images in read_geneval_folder(root):
        if spec.tag not in TAGS or spec.split != "test":
            continue
        c = out[spec.tag]
        for path in images:
            dets = detect(load_image(path))
            kind, _ = first_failure(dets, spec)
            c["images"] += 1
            c["judged right"] += kind is None
            if kind == "shape":
                c["missing shape"] += 1
                c[missing_shape_kind(dets, spec)] += 1
            rel = relation_kind(dets, spec)
            if rel is not None:
                c["both shapes drawn"] += 1
                c[f"relation {rel}"] += 1
    table = {t: dict(c) for t, c in out.items()}
    table["all"] = dict(sum(out.values(), Counter()))
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("eval_dir", help="the --out folder of `harmon eval model`")
    p.add_argument("--json", default=str(HERE / "results" / "failure_modes.json"))
    args = p.parse_args()
    table = count(args.eval_dir)
    keys = ["images", "judged right", "missing shape", "copied", "other", "neither",
            "both shapes drawn", "relation right", "relation opposite", "relation other axis"]
    print(f"{'':12s}" + "".join(f"{k:>{len(k) + 2}s}" for k in keys))
    for tag, row in table.items():
        print(f"{tag:12s}" + "".join(f"{row.get(k, 0):{len(k) + 2}d}" for k in keys))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"eval_dir": str(args.eval_dir), "counts": table},
                                          indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Does the generator put an object where the words say? Sampled images, read by the judge.

``caption_use.py`` asks which words lower the generator's loss; this asks what its drawings do.
For each of the nine places a detailed caption names ("at the top left", "in the center", ...)
it draws single objects whose caption names that place, in the training captions' own form ("a
red circle at the top left on a plain dark blue background"), with the model's cfg and
temperature, one draw per image (no best-of reranking: this asks what the generator does) and one
seed. The judge finds the objects (:func:`harmon.eval.judge.detect`); an image counts
when the object of the asked colour (else the largest one) has its centre in the named cell of
the 3 x 3 grid. A generator deaf to place words scores about what its objects' unprompted
spread gives (most land in the middle cell: about 1/9 over all places, higher for the centre);
the rendered scenes themselves score 1.0.

    python benchmarks/place_use.py                               # the shipped model
    python benchmarks/place_use.py --checkpoint runs/X/final --per-place 8 --seed 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harmon import Harmon
from harmon.data.shapes import BACKGROUNDS, COLOR_NAMES, SHAPE_NAMES
from harmon.data.shapeworld import _REGIONS, region_of
from harmon.eval.judge import detect

HERE = Path(__file__).resolve().parent


def place_prompts(per_place: int) -> list[tuple[str, str, str]]:
    """``(region, colour, prompt)`` for ``per_place`` prompts per region, colours, shapes and
    backgrounds cycled so that every place sees a spread of them."""
    backgrounds = list(BACKGROUNDS)
    out = []
    for r, (region, phrase) in enumerate(_REGIONS):
        for k in range(per_place):
            i = r * per_place + k
            colour = COLOR_NAMES[i % len(COLOR_NAMES)]
            shape = SHAPE_NAMES[(i // len(COLOR_NAMES) + i) % len(SHAPE_NAMES)]
            bg = backgrounds[i % len(backgrounds)]
            out.append((region, colour, f"a {colour} {shape} {phrase} on a plain {bg} background"))
    return out


def placed_cell(image, colour: str) -> str | None:
    """The cell of the object of ``colour`` in ``image`` (else of the largest object), or None
    when the judge finds no object."""
    found = detect(image)
    if not found:
        return None
    same = [d for d in found if d.color == colour]
    obj = max(same or found, key=lambda d: d.area)
    return region_of(*obj.center)


def measure(model: Harmon, per_place: int, seed: int, batch: int = 16) -> dict:
    items = place_prompts(per_place)
    t0 = time.perf_counter()
    images = []
    for k in range(0, len(items), batch):
        images += model.generate([p for _, _, p in items[k:k + batch]], seed=seed + k,
                                 candidates=1, name_colors=False)
    seconds = time.perf_counter() - t0
    rows = {region: {"images": 0, "in place": 0, "no object": 0} for region, _ in _REGIONS}
    spread = {region: 0 for region, _ in _REGIONS}  # where objects land, whatever was asked
    for (region, colour, _), im in zip(items, images):
        cell = placed_cell(im, colour)
        rows[region]["images"] += 1
        if cell is None:
            rows[region]["no object"] += 1
            continue
        spread[cell] += 1
        rows[region]["in place"] += int(cell == region)
    n = len(items)
    hits = sum(r["in place"] for r in rows.values())
    # every place is asked equally often, so a generator that ignores the words lands in the
    # asked cell 1/9 of the time wherever it tends to draw
    chance = 1 / len(rows)
    return {"images": n, "in place": hits, "share": hits / n, "chance": chance,
            "by place": rows, "landed in": spread, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--per-place", type=int, default=8, help="images per named place (9 places)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "place_use.json"))
    args = ap.parse_args()
    if args.per_place < 1:
        ap.error(f"--per-place must be >= 1, got {args.per_place}")
    model = Harmon.from_pretrained(args.checkpoint, dtype="float32")
    res = measure(model, args.per_place, args.seed)
    print(f"{'place':14s} {'images':>6s} {'in place':>8s} {'no object':>9s}")
    for region, r in res["by place"].items():
        print(f"{region:14s} {r['images']:6d} {r['in place']:8d} {r['no object']:9d}")
    print(f"in the named place: {res['in place']}/{res['images']} = {res['share']:.3f} "
          f"(words ignored: {res['chance']:.3f}); {res['seconds']:.0f} s")
    res.update(checkpoint=args.checkpoint or "shipped", seed=args.seed, per_place=args.per_place)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

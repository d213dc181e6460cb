"""ShapeWorld speed: images generated per second and images judged per second, by image size.

Usage::

    python benchmarks/shapeworld_speed.py [--n 200] [--sizes 64 128 256 512]
                                          [--out benchmarks/results/shapeworld_speed.json]

"generate" = sample a scene + render it to a uint8 array (what a data-loader worker does per item);
"t2i item" = the full stream item (scene, caption, PIL image); "judge" = detect objects and check the
prompt spec (blurred, noisy reference images of the evaluation prompts). Single process, one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_ROOT))

from harmon.data import ShapeWorld, degrade  # noqa: E402
from harmon.eval import eval_prompts, judge_image  # noqa: E402
from harmon.eval.judge import shape_references  # noqa: E402


def _rate(n: int, fn) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images per measurement")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results" / "shapeworld_speed.json")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    shape_references()  # one-off calibration, reported apart
    calib = time.perf_counter() - t
    specs = eval_prompts("all")
    rows = []
    for size in args.sizes:
        world = ShapeWorld(size=size, seed=0)
        gen = _rate(args.n, lambda i: world.sample(i).render_array())
        item = _rate(args.n, lambda i: world.t2i_item(i))
        imgs = [(specs[i % len(specs)], degrade(world.scene_for_spec(specs[i % len(specs)], i).render_array(),
                                                  1.0, 10.0, seed=i)) for i in range(args.n)]
        correct = []
        judge = _rate(args.n, lambda i: correct.append(judge_image(imgs[i][1], imgs[i][0]).correct))
        rows.append({"size": size, "generate_images_per_s": gen, "t2i_items_per_s": item,
                     "judge_images_per_s": judge, "judge_accuracy": sum(correct) / len(correct)})

    print(f"ShapeWorld speed ({args.n} images per cell, 1 process; judge calibration {calib:.2f} s once)")
    print(f"{'size':>6}{'generate images/s':>20}{'t2i items/s':>14}{'judge images/s':>17}{'judge acc':>11}")
    for r in rows:
        print(f"{r['size']:>6}{r['generate_images_per_s']:>20.0f}{r['t2i_items_per_s']:>14.0f}"
              f"{r['judge_images_per_s']:>17.0f}{r['judge_accuracy']:>11.3f}")
    result = {"benchmark": "shapeworld_speed", "n": args.n, "judge_calibration_s": calib, "results": rows,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

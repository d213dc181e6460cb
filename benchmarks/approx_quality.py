"""Quality and speed of the approximate sampling options, on the shipped model, side by side.

Every setting generates the ShapeWorld evaluation prompts (both splits) with the same seeds and
is scored by the judge (GenEval-style, :mod:`harmon.eval.judge`); seconds per image are measured
in the same run. The first row is the exact setting (the reference's algorithm: K = 64 outer
steps, 100 ancestral head steps); the others change one thing each: fewer head steps (a coarser
respacing), the DDIM head update, fewer outer steps.

    python benchmarks/approx_quality.py                    # every setting, 2 samples per prompt
    python benchmarks/approx_quality.py --samples 1 --settings exact head25 ddim25 steps16
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from harmon import Harmon
from harmon.eval.model_eval import evaluate_generation

HERE = Path(__file__).resolve().parent

SETTINGS = {
    "exact": {},
    "head50": {"head_steps": 50},
    "head25": {"head_steps": 25},
    "ddim50": {"head_steps": 50, "head_sampler": "ddim"},
    "ddim25": {"head_steps": 25, "head_sampler": "ddim"},
    "ddim10": {"head_steps": 10, "head_sampler": "ddim"},
    "steps32": {"steps": 32},
    "steps16": {"steps": 16},
    "steps8": {"steps": 8},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model directory (default: the shipped one)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--samples", type=int, default=2, help="images per evaluation prompt")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--json", default=str(HERE / "results" / "approx_quality.json"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = Harmon.from_pretrained(args.checkpoint, device="cpu")
    rows = []
    print(f"{'setting':<9}{'s/image':>9}{'overall':>9}  per category (held-out overall)")
    for name in args.settings:
        t0 = time.perf_counter()
        summary = evaluate_generation(model, samples=args.samples, seed=0, progress=False,
                                      limit=args.limit, candidates=1, name_colors=False,
                                      **SETTINGS[name])
        seconds = time.perf_counter() - t0
        n = summary["images"] + summary.get("heldout", {}).get("images", 0)
        cats = {k: round(v["accuracy"], 3) for k, v in summary["categories"].items()}
        held = summary.get("heldout", {}).get("overall")
        rows.append({"setting": name, "kwargs": SETTINGS[name], "s_per_image": seconds / n,
                     "overall": summary["overall"], "categories": cats, "heldout_overall": held,
                     "images": n})
        print(f"{name:<9}{seconds / n:>9.3f}{summary['overall']:>9.3f}  {cats} "
              f"({held if held is None else round(held, 3)})", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "model": model.name,
                               "samples": args.samples, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

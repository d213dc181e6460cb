"""The ShapeWorld judge's scores as the sampling settings change: guidance scale and its schedule,
temperature, number of steps and rounds of self-correction, one setting per row, the same prompts
and seeds in every row.

Papers report FID against the guidance scale as a curve; this is that curve for the judge, so that a
model's default settings can be chosen from a measurement. Every evaluation prompt of both splits
(``--limit N``: the first N only), ``--samples`` images each, judged as ``harmon eval model``
does; the time per image is measured on the same run (batches of 16 prompts).

    python benchmarks/guidance_sweep.py                                  # the shipped model
    python benchmarks/guidance_sweep.py --cfg 3 5 --cfg-schedule constant linear --temperature 0.8 1
    python benchmarks/guidance_sweep.py --checkpoint runs/X/final --limit 60 --out /tmp/sweep.json
    python benchmarks/guidance_sweep.py --cfg 3 --refine 0 3 --seed 1 \
        --out benchmarks/results/refine_seed1.json
    python benchmarks/guidance_sweep.py --cfg 3 --candidates 2 --name-colors --seed 1  # defaults
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from harmon import Harmon
from harmon.data.shapeworld import GENEVAL_TAGS
from harmon.eval.model_eval import evaluate_generation
from harmon.generate import REFINE_FRACTION, REFINE_STEPS
from harmon.eval.shapes_cli import SHORT_TAGS

HERE = Path(__file__).resolve().parent


def sweep(model: Harmon, settings: list[tuple[float, str, float, int, int]], samples: int,
          seed: int, limit: int | None, on_row=None, refine_fraction: float = REFINE_FRACTION,
          refine_steps: int = REFINE_STEPS, candidates: int = 1,
          name_colors: bool = False) -> list[dict]:
    """One row per ``(cfg, cfg_schedule, temperature, steps, refine)``: the judge's summary and
    seconds per image, each image the best of ``candidates`` draws by the model's own reading
    (default 1: the generator alone), the colours a prompt leaves free named when ``name_colors``
    (default: the prompt as given). ``on_row(rows)`` is called after each row (the CLI
    rewrites its JSON there, so a sweep stopped half-way keeps the rows it measured)."""
    rows = []
    for cfg, schedule, temperature, steps, refine in settings:
        t0 = time.perf_counter()
        summary = evaluate_generation(model, samples=samples, seed=seed, limit=limit, progress=False,
                                      cfg=cfg, cfg_schedule=schedule, temperature=temperature,
                                      steps=steps, refine=refine, refine_fraction=refine_fraction,
                                      refine_steps=refine_steps, candidates=candidates,
                                      name_colors=name_colors)
        seconds = time.perf_counter() - t0
        n = summary["images"] + summary.get("heldout", {}).get("images", 0)
        rows.append({"cfg": cfg, "cfg_schedule": schedule, "temperature": temperature, "steps": steps,
                     "refine": refine, "refine_fraction": refine_fraction,
                     "refine_steps": refine_steps, "candidates": candidates,
                     "name_colors": name_colors,
                     "summary": summary, "images": n,
                     "seconds_per_image": seconds / max(n, 1)})
        print_row(rows[-1])
        if on_row is not None:
            on_row(rows)
    return rows


def print_row(row: dict) -> None:
    s = row["summary"]
    cats = s["categories"]
    held = s.get("heldout", {}).get("overall")
    parts = [f"{SHORT_TAGS[t]} {cats[t]['correct']:>3}/{cats[t]['images']:<3}" for t in GENEVAL_TAGS
             if t in cats]
    overall = "-" if s["overall"] is None else f"{s['overall']:.3f}"
    print(f"cfg {row['cfg']:>4g} {row['cfg_schedule']:<8}  temp {row['temperature']:>4g}  steps {row['steps']:>3}  "
          f"refine {row['refine']}  "
          f"overall {overall}  held-out {'-' if held is None else f'{held:.3f}'}  "
          + "  ".join(parts) + f"  {row['seconds_per_image']:.2f} s/image", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model directory or preset (default: shipped)")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    p.add_argument("--cfg-schedule", nargs="+", default=["constant"], choices=["constant", "linear"])
    p.add_argument("--temperature", type=float, nargs="+", default=None,
                   help="head temperatures (default: the model's, see harmon info)")
    p.add_argument("--steps", type=int, nargs="+", default=[64])
    p.add_argument("--refine", type=int, nargs="+", default=[0], help="rounds of self-correction")
    p.add_argument("--refine-fraction", type=float, default=REFINE_FRACTION,
                   help="share of the tokens each round draws again")
    p.add_argument("--refine-steps", type=int, default=REFINE_STEPS, help="steps of each round")
    p.add_argument("--samples", type=int, default=1, help="images per prompt")
    p.add_argument("--candidates", type=int, default=1,
                   help="draws per image judged, the one the model reads as most like its prompt "
                        "kept (default 1: the generator alone, as in every sweep of "
                        "docs/shapeworld_log.md, whatever the model's own default)")
    p.add_argument("--name-colors", action="store_true",
                   help="name the colours a prompt leaves free (generate(name_colors=True); "
                        "default: the prompt as given, as in every sweep before it, whatever the model's "
                        "own default)")
    p.add_argument("--limit", type=int, default=None, help="only the first N evaluation prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "guidance_sweep.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = Harmon.from_pretrained(args.checkpoint)
    temperatures = args.temperature or [model.sampling["temperature"]]
    settings = list(itertools.product(args.cfg, args.cfg_schedule, temperatures, args.steps,
                                      args.refine))
    print(f"{model.name}: {len(settings)} settings, {args.samples} image(s) per prompt, seed {args.seed}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> None:
        out.write_text(json.dumps({"model": model.name, "provenance": model.provenance,
                                   "samples": args.samples, "seed": args.seed, "limit": args.limit,
                                   "threads": args.threads, "rows": rows}, indent=1) + "\n")

    sweep(model, settings, args.samples, args.seed, args.limit, on_row=write,
          refine_fraction=args.refine_fraction, refine_steps=args.refine_steps,
          candidates=args.candidates, name_colors=args.name_colors)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

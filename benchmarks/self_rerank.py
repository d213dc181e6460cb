"""Best of N by the model's own judgement: does reading its images back make its drawing better?

Harmon is one model for both directions, so it can check its own work: ``generate(prompt,
candidates=C)`` draws C images and keeps the one the model itself scores highest against the
prompt (``Harmon.score``: by default P(yes) to "Is there {prompt} in the image?"). This measures what that buys on the ShapeWorld judge's evaluation
prompts, side by side in one run: every prompt's C candidates are drawn once (exactly the draws
``generate(candidates=C)`` makes, batches of 16 prompts as ``harmon eval model``), each is judged
and scored, and the picks are compared:

- ``first``: the first candidate (what ``candidates=1`` would return, in distribution);
- ``any one``: the mean over the C candidates (the expected score of one random draw);
- ``METHOD, best of k``: the highest self-score (``Harmon.score(method=METHOD)``: "caption" or
  "yes") among the first k candidates, k = 2, 4, ... C;
- ``oracle``: the prompt counts as right when any candidate is (an upper bound for any reranker).

The candidates are drawn from the prompt as given, whatever the model's default; with
``--name-colors`` each from its own rewrite (``generate(name_colors=True)``), read against the
text it was drawn from, as ``generate`` reads it.

    python benchmarks/self_rerank.py                        # the shipped model, C = 4
    python benchmarks/self_rerank.py --candidates 8 --limit 64 --checkpoint runs/X/final
    python benchmarks/self_rerank.py --name-colors --seed 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from harmon import Harmon
from harmon.data.shapeworld import GENEVAL_TAGS
from harmon.eval.judge import judge_image, summarize
from harmon.eval.model_eval import generate_for_specs
from harmon.eval.prompts import eval_prompts
from harmon.eval.shapes_cli import SHORT_TAGS
from harmon.pipeline import SCORE_METHODS

HERE = Path(__file__).resolve().parent


def measure(model: Harmon, candidates: int, seed: int, limit: int | None,
            name_colors: bool = False) -> dict:
    """Judge verdicts and self-scores of ``candidates`` draws per evaluation prompt (of its
    rewrite with the free colours named, when ``name_colors``), and the judge's summaries of
    each way of picking one."""
    specs = eval_prompts("all")[:limit]
    t0 = time.perf_counter()
    # one draw each (candidates=1 whatever the model's default): the pool the picks come from
    images = generate_for_specs(model, specs, candidates, seed=seed, candidates=1,
                                name_colors=name_colors)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool = [im for s in specs for im in images[s.prompt]]  # prompt-major, C per prompt
    texts = [im.info["prompt"] for im in pool]  # the text each was drawn from
    scores = {}
    for m in SCORE_METHODS:
        flat = model.score(pool, texts, method=m).view(len(specs), candidates).tolist()
        scores[m] = {s.prompt: row for s, row in zip(specs, flat)}
    t_score = time.perf_counter() - t0
    verdicts = {s.prompt: [judge_image(im, s) for im in images[s.prompt]] for s in specs}

    def best_of(k: int, method: str) -> dict:
        picks = [max(range(k), key=lambda i: scores[method][s.prompt][i]) for s in specs]
        return summarize([verdicts[s.prompt][i] for s, i in zip(specs, picks)])

    rows = {"first": summarize([verdicts[s.prompt][0] for s in specs]),
            "any one": summarize([r for s in specs for r in verdicts[s.prompt]])}
    ks = sorted({2 ** j for j in range(1, candidates.bit_length()) if 2 ** j <= candidates}
                | {candidates})
    for m in SCORE_METHODS:
        for k in ks:
            rows[f"{m}, best of {k}"] = best_of(k, m)
    # the oracle: a right candidate when there is one
    rows["oracle"] = summarize([next((r for r in verdicts[s.prompt] if r.correct),
                                     verdicts[s.prompt][0]) for s in specs])
    n = len(specs) * candidates
    return {"rows": rows, "prompts": len(specs), "candidates": candidates,
            "seconds_per_image": t_gen / n,
            "seconds_per_score": t_score / (n * len(SCORE_METHODS)),
            "scores": scores,
            "correct": {p: [r.correct for r in v] for p, v in verdicts.items()}}


def print_table(result: dict) -> None:
    print(f"{'pick':<24} {'overall':>7} {'held-out':>8}  images right per category")
    for name, s in result["rows"].items():
        cats = s["categories"]
        held = s.get("heldout", {})
        right = sum(c["correct"] for c in cats.values()) + \
            sum(c["correct"] for c in held.get("categories", {}).values())
        parts = [f"{SHORT_TAGS[t]} {cats[t]['accuracy']:.2f}" for t in GENEVAL_TAGS if t in cats]
        held_s = "-" if held.get("overall") is None else f"{held['overall']:.3f}"
        print(f"{name:<24} {s['overall']:>7.3f} {held_s:>8}  " + "  ".join(parts)
              + f"  (right: {right})")
    print(f"{result['seconds_per_image']:.2f} s per candidate drawn, "
          f"{result['seconds_per_score']:.3f} s per candidate scored")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model directory or preset (default: shipped)")
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="only the first N evaluation prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name-colors", action="store_true",
                   help="draw each candidate from its own rewrite with the free colours named")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "self_rerank.json"))
    args = p.parse_args()
    if args.candidates < 2:
        p.error(f"--candidates must be at least 2 to compare picks, got {args.candidates}")
    torch.set_num_threads(args.threads)
    model = Harmon.from_pretrained(args.checkpoint)
    print(f"{model.name}: {args.candidates} candidates per prompt, seed {args.seed}"
          + (", free colours named" if args.name_colors else ""))
    result = measure(model, args.candidates, args.seed, args.limit, args.name_colors)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model.name, "provenance": model.provenance,
                               "seed": args.seed, "limit": args.limit, "threads": args.threads,
                               "name_colors": args.name_colors,
                               **result}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Score a model on ShapeWorld: generation (GenEval-style judge) and understanding (VQA, POPE).

    harmon eval model --checkpoint DIR --samples 2 --out runs/eval     # default: the shipped model

Generation: every evaluation prompt (the test split and the held-out colour-shape split) is
generated ``samples`` times with default settings, written in GenEval's folder layout and scored
by the judge, and so are the model's VAE reconstructions of true scenes for the same prompts (the
best a generator can score through this autoencoder). Understanding: the questions of fresh
evaluation scenes are answered greedily and scored per question type, with POPE accuracy,
precision, recall, F1 and yes-ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..data.shapeworld import ShapeWorld
from .judge import judge_image, summarize
from .prompts import eval_prompts, reference_images, write_geneval_folder
from .shapes_cli import format_table
from .vqa import build_vqa_eval_set, evaluate_vqa


def evaluate_generation(model, samples: int = 2, batch_size: int = 16, seed: int = 0,
                        out_dir: str | Path | None = None, progress: bool = True,
                        limit: int | None = None, **generate_kwargs) -> dict:
    """Judge scores of generated images for all evaluation prompts (both splits; the first
    ``limit`` prompts only, when given)."""
    specs = eval_prompts("all")[:limit]
    images = generate_for_specs(model, specs, samples, batch_size, seed, progress,
                                **generate_kwargs)
    if out_dir is not None:
        write_geneval_folder(out_dir, specs, lambda i, spec: images[spec.prompt])
    results = [judge_image(im, spec) for spec in specs for im in images[spec.prompt]]
    summary = summarize(results)
    for spec in specs:  # prompts per category, beside the images (as evaluate_folder reports)
        group = summary["heldout"] if spec.split == "heldout" else summary
        cat = group["categories"][spec.tag]
        cat["prompts"] = cat.get("prompts", 0) + 1
    return summary


def evaluate_reconstruction(model, samples: int = 2, seed: int = 0, batch_size: int = 64,
                            limit: int | None = None) -> dict:
    """Judge scores of the model's VAE round trips (:meth:`Harmon.reconstruct`) of true scenes for
    every evaluation prompt (``samples`` each, world seed ``seed``): what a perfect generator
    would score through this autoencoder, the ceiling of :func:`evaluate_generation`. Layout as
    :func:`~harmon.eval.judge.summarize`."""
    specs = eval_prompts("all")[:limit]
    world = ShapeWorld(size=model.cfg.image_size, seed=seed)
    pairs = [(spec, im) for spec in specs for im in reference_images(world, spec, samples)]
    results = []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b: b + batch_size]
        images = model.reconstruct([im for _, im in chunk])
        results += [judge_image(im, spec) for (spec, _), im in zip(chunk, images)]
    return summarize(results)


def generate_for_specs(model, specs, samples: int, batch_size: int = 16, seed: int = 0,
                       progress: bool = True, **generate_kwargs) -> dict[str, list]:
    """``{prompt: [samples images]}``, in batches of ``batch_size`` prompts seeded ``seed + b``
    (b = the batch's first prompt): ``harmon eval model`` and the benchmarks draw the same
    images for the same settings."""
    images: dict[str, list] = {}
    bar = tqdm(total=len(specs), desc="generating", unit="prompt", disable=not progress)
    for b in range(0, len(specs), batch_size):
        chunk = specs[b: b + batch_size]
        out = model.generate([s.prompt for s in chunk], num_images_per_prompt=samples,
                             seed=seed + b, **generate_kwargs)
        for i, spec in enumerate(chunk):
            images[spec.prompt] = out[i * samples: (i + 1) * samples]
        bar.update(len(chunk))
    bar.close()
    return images


def answer_items(model, items, batch_size: int = 32, progress: bool = True) -> list[str]:
    """Greedy answers to VQA items (:class:`harmon.eval.vqa.VQAItem`: a scene and a question), in
    batches; one string per item."""
    preds: list[str] = []
    for b in tqdm(range(0, len(items), batch_size), desc="answering", unit="batch",
                  disable=not progress):
        chunk = items[b: b + batch_size]
        preds += model.answer([it.scene.render() for it in chunk], [it.question for it in chunk],
                              max_new_tokens=24)
    return preds


def evaluate_understanding(model, n_images: int = 60, seed: int = 0, batch_size: int = 32,
                           progress: bool = True) -> dict:
    """Greedy answers to every question of ``n_images`` evaluation scenes, scored."""
    items = build_vqa_eval_set(n_images, size=model.cfg.image_size, seed=seed)
    return evaluate_vqa(items, answer_items(model, items, batch_size, progress))


def add_eval_model_command(subparsers) -> None:
    from ..cli import _add_model_args, examples
    from ..understand import SCORE_METHODS

    p = subparsers.add_parser("model", help="generate and answer on ShapeWorld, then score",
                              **examples("harmon eval model --out runs/eval",
                                         "harmon eval model --samples 4 --vqa-images 200 "
                                         "--checkpoint runs/shapeworld_model_stage3/final"))
    p.add_argument("--samples", type=int, default=2, help="images per evaluation prompt")
    p.add_argument("--vqa-images", type=int, default=60, help="evaluation scenes for questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the images (GenEval layout) and scores.json")
    p.add_argument("--mode", default="fast", choices=["fast", "reference"])
    p.add_argument("--candidates", type=int, default=None,
                   help="best of N images by the model's own score (harmon generate --candidates; "
                        "default: the model's, see harmon info)")
    p.add_argument("--rerank", default=None, choices=SCORE_METHODS,
                   help="how the model compares candidates (harmon generate --rerank; default: "
                        "the model's, see harmon info)")
    p.add_argument("--name-colors", action=argparse.BooleanOptionalAction, default=None,
                   help="name the colours a prompt leaves free (harmon generate --name-colors; "
                        "default: the model's, see harmon info)")
    p.add_argument("--refine", type=int, default=0,
                   help="rounds of self-correction per image (harmon generate --refine)")
    _add_model_args(p)
    p.set_defaults(func=_cmd_eval_model)


def _cmd_eval_model(args) -> int:
    from ..cli import _load

    model = _load(args)
    if args.candidates is None:
        args.candidates = model.sampling["candidates"]
    if args.rerank is None:
        args.rerank = model.sampling["rerank"]
    if args.name_colors is None:
        args.name_colors = model.sampling["name_colors"]
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else None
    gen = evaluate_generation(model, args.samples, seed=args.seed,
                              out_dir=out / "images" if out else None, mode=args.mode,
                              candidates=args.candidates, rerank=args.rerank,
                              name_colors=args.name_colors, refine=args.refine)
    vqa = evaluate_understanding(model, args.vqa_images, seed=args.seed)
    ceiling = evaluate_reconstruction(model, args.samples, seed=args.seed)
    best = f" (each image the best of {args.candidates} by --rerank {args.rerank})" \
        if args.candidates > 1 else ""
    best += f" ({args.refine} rounds of self-correction)" if args.refine else ""
    best += " (free colours named)" if args.name_colors else ""
    print(format_table(gen, title=f"generation: {model.name}{best}"))
    print(f"ceiling (the judge on the VAE's reconstructions of true scenes): overall "
          f"{ceiling['overall']:.3f}, held-out {ceiling['heldout']['overall']:.3f}")
    print(f"understanding: {json.dumps(_vqa_summary(vqa))}")
    scores = {"model": model.name, "generation": gen, "understanding": vqa, "ceiling": ceiling,
              "seconds": time.perf_counter() - t0, "samples": args.samples,
              "vqa_images": args.vqa_images, "seed": args.seed, "candidates": args.candidates,
              "rerank": args.rerank, "name_colors": args.name_colors, "refine": args.refine}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.json").write_text(json.dumps(scores, indent=1, default=str))
        print(f"wrote {out / 'scores.json'}", file=sys.stderr)
    return 0


def _vqa_summary(vqa: dict) -> dict:
    per = {k: round(v["accuracy"], 3) for k, v in vqa["per_type"].items()}
    pope = vqa["pope"].get("all", {})
    return {**per, "pope_f1": round(pope.get("f1", float("nan")), 3),
            "pope_yes_ratio": round(pope.get("yes_ratio", float("nan")), 3)}

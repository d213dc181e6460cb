"""``harmon eval shapes``: score a folder of generated images with the ShapeWorld judge.

Usage::

    harmon eval shapes --images DIR [--json OUT.json]        # score DIR (GenEval layout), print a table
    harmon eval shapes --write-metadata prompts.jsonl          # the evaluation prompts, GenEval metadata
    harmon eval shapes --write-reference DIR [--samples 4]     # ShapeWorld's own images for the prompts

The image folder is laid out as GenEval lays it out (see :mod:`harmon.eval.prompts`):
``DIR/<00000>/metadata.jsonl`` and ``DIR/<00000>/samples/<00000>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from harmon.data.shapeworld import GENEVAL_TAGS

from .judge import (FAILURE_KINDS, ImageLoadError, JudgeResult, detect, judge_detections,
                    load_image, summarize)
from .prompts import eval_prompts, read_geneval_folder, write_metadata_jsonl, write_reference_folder

#: Short category names for one-line summaries (the benchmarks' rows).
SHORT_TAGS = {"single_object": "single", "two_object": "two", "counting": "count",
              "colors": "colour", "position": "pos", "color_attr": "attr"}


def evaluate_folder(root: str | Path, skip_corrupt: bool = False, progress: bool = False
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Judge every sample of a GenEval-layout folder.

    Args:
        root: the folder.
        skip_corrupt: count unreadable images as failures (with a warning) instead of raising.
        progress: show a progress bar on stderr.

    Returns:
        ``(records, summary)``: one record per image (``prompt_dir``, ``image``, ``tag``, ``split``,
        ``prompt``, ``correct``, ``reason``, ``detections``), and :func:`~harmon.eval.judge.summarize`'s
        output plus ``prompts`` per category.

    Raises:
        ValueError: bad layout or metadata; :class:`~harmon.eval.judge.ImageLoadError` for an
            unreadable image unless ``skip_corrupt``.
    """
    from tqdm import tqdm

    entries = read_geneval_folder(root)
    total = sum(len(imgs) for _, _, imgs in entries)
    if total == 0:
        raise ValueError(f"{str(root)!r} has prompt folders but no sample images (expected */samples/*.png)")
    records: list[dict[str, Any]] = []
    results: list[JudgeResult] = []
    prompts: dict[tuple[str, str], int] = {}
    with tqdm(total=total, desc="judging", unit="img", disable=not progress, file=sys.stderr) as bar:
        for d, spec, imgs in entries:
            key = ("heldout" if spec.split == "heldout" else "main", spec.tag)
            prompts[key] = prompts.get(key, 0) + (1 if imgs else 0)
            for path in imgs:
                try:
                    r = judge_detections(detect(load_image(path)), spec)
                except ImageLoadError as e:
                    if not skip_corrupt:
                        raise
                    print(f"warning: {e}; counted as incorrect", file=sys.stderr)
                    r = JudgeResult(spec.tag, spec.prompt, False, f"unreadable image: {e}", spec.split)
                results.append(r)
                records.append({"prompt_dir": d.name, "image": str(path), "tag": spec.tag,
                                "split": spec.split, "prompt": spec.prompt, "correct": r.correct,
                                "reason": r.reason, "failure": r.failure,
                                "detections": [{"shape": x.shape, "color": x.color,
                                                "bbox": [round(v, 4) for v in x.bbox]}
                                               for x in r.detections]})
                bar.update(1)
    summary = summarize(results)
    for group, table in (("main", summary), ("heldout", summary.get("heldout"))):
        if table is not None:
            for tag, cat in table["categories"].items():
                cat["prompts"] = prompts.get((group, tag), 0)
    return records, summary


def format_table(summary: dict[str, Any], title: str = "") -> str:
    """The per-category table of :func:`evaluate_folder`'s summary, as text."""
    lines = [title] if title else []
    header = (f"{'category':<16}{'prompts':>8}{'images':>8}{'correct':>9}{'accuracy':>10}   "
              + "".join(f"{k:>9}" for k in FAILURE_KINDS) + f"{'objects':>9}{'no shape':>9}")

    def block(table: dict[str, Any], label: str):
        if label:
            lines.append(label)
        lines.append(header)
        for tag in GENEVAL_TAGS:
            c = table["categories"].get(tag)
            if c is None:
                continue
            fails = c.get("failures", {})
            lines.append(f"{tag:<16}{c.get('prompts', 0):>8}{c['images']:>8}{c['correct']:>9}"
                         f"{c['accuracy']:>10.4f}   " + "".join(f"{fails.get(k, 0):>9}" for k in FAILURE_KINDS)
                         + f"{c.get('objects', 0):>9}{c.get('unrecognised', 0):>9}")
        lines.append(f"{'overall':<16}{'':>8}{table['images']:>8}{'':>9}{table['overall']:>10.4f}")

    if summary["categories"]:
        block(summary, "")
    if "heldout" in summary:
        if summary["categories"]:
            lines.append("")
        block(summary["heldout"], "held-out colour-shape pairs:")
    lines.append("(overall = mean of the category accuracies, as in GenEval; shape .. extra: failed "
                 "images by the first criterion they fail; objects: detected, no shape: of no known "
                 "shape)")
    return "\n".join(lines)


def run_eval_shapes(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``harmon eval shapes`` (returns the exit code)."""
    out = out or sys.stdout
    if args.write_metadata is not None:
        n = write_metadata_jsonl(args.write_metadata, eval_prompts(args.split))
        print(f"wrote {n} prompts ({args.split}) to {args.write_metadata}", file=out)
        return 0
    if args.write_reference is not None:
        if args.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {args.samples}")
        specs = eval_prompts(args.split)
        write_reference_folder(args.write_reference, specs, samples=args.samples, size=args.size,
                               seed=args.seed)
        print(f"wrote {len(specs)} prompts x {args.samples} reference images ({args.size} px) to "
              f"{args.write_reference}", file=out)
        return 0
    records, summary = evaluate_folder(args.images, skip_corrupt=args.skip_corrupt,
                                       progress=not args.no_progress)
    print(format_table(summary, f"ShapeWorld judge, {args.images}"), file=out)
    if args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "images": records}, indent=1))
        print(f"wrote {args.json}", file=out)
    return 0


def add_eval_shapes_command(subparsers) -> argparse.ArgumentParser:
    """Add ``shapes`` to the ``harmon eval`` subparsers; the handler is ``args.func(args)``."""
    from ..cli import examples

    p = subparsers.add_parser(
        "shapes", help="score generated images of ShapeWorld prompts (GenEval-style)",
        description="Score a GenEval-layout folder of generated images with the ShapeWorld judge and "
                    "print accuracy per category; or write the prompts / reference images.",
        **examples("harmon eval shapes --images runs/eval/images --json runs/eval/judge.json",
                   "harmon eval shapes --write-metadata prompts.jsonl --split test",
                   "harmon eval shapes --write-reference runs/reference --samples 4 --size 64"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", type=Path, metavar="DIR",
                   help="folder laid out as GenEval lays it out: DIR/00000/metadata.jsonl, "
                        "DIR/00000/samples/*.png")
    g.add_argument("--write-metadata", type=Path, metavar="JSONL",
                   help="write the evaluation prompts and exit")
    g.add_argument("--write-reference", type=Path, metavar="DIR",
                   help="write ShapeWorld's own images for the evaluation prompts (a perfect generator)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write per-image results and the summary")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="count unreadable images as wrong instead of failing")
    p.add_argument("--split", choices=["test", "heldout", "all"], default="all",
                   help="prompt split for --write-metadata / --write-reference (default: all)")
    p.add_argument("--samples", type=int, default=4,
                   help="images per prompt for --write-reference (default 4)")
    p.add_argument("--size", type=int, default=128, help="image size for --write-reference (default 128)")
    p.add_argument("--seed", type=int, default=0, help="world seed for --write-reference")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval_shapes)
    return p

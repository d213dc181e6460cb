"""``harmon data export``: write ShapeWorld samples to disk in the training formats.

Usage::

    harmon data export --out DIR -n 10000 [--size 128] [--seed 0] [--start 0]
                       [--task t2i|vqa|both] [--format files|wds|both] [--shard-size 1000]

Layout of ``DIR``:

- ``files``: ``images/{index:08d}.png``; ``t2i.jsonl`` (one line per image: ``id``, ``index``, ``image``
  (relative path), ``caption``, ``style``, ``captions`` (every style), ``objects``, ``background``);
  ``vqa.jsonl`` (``id``, ``index``, ``image``, ``conversations``, ``qtypes``) and ``llava.json`` (the same
  records as one JSON list, LLaVA's format).
- ``wds``: ``shards/shapeworld-{k:06d}.tar``, webdataset-style: per sample ``{key}.png``, ``{key}.txt``
  (the caption, t2i) and ``{key}.json`` (the line of t2i.jsonl and/or vqa.jsonl, without ``image``).

The records are exactly what :class:`~harmon.data.shapeworld.ShapeWorldT2I` and
:class:`~harmon.data.shapeworld.ShapeWorldVQA` yield for the same ``(seed, index)``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, TextIO

from .shapeworld import ShapeWorld


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    tar.addfile(info, io.BytesIO(data))


EXPORT_NAMES = ("images", "shards", "t2i.jsonl", "vqa.jsonl", "llava.json")  # what export writes


def export(out_dir: str | Path, n: int, size: int = 128, seed: int = 0, start: int = 0, task: str = "both",
           fmt: str = "both", shard_size: int = 1000, progress: bool = True, holdout: bool = True,
           turns: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Write scenes ``start .. start + n - 1`` of ``ShapeWorld(size, seed, holdout)``.

    Args:
        out_dir: destination folder (created). A folder that already holds an export is refused
            unless ``overwrite`` (shards are numbered from 0 and the JSONL files rewritten, so a
            second export into it would replace the first).
        n: number of samples (>= 1).
        task: 't2i', 'vqa' or 'both'.
        fmt: 'files', 'wds' or 'both'.
        shard_size: samples per tar shard.
        progress: show a tqdm progress bar on stderr.
        turns: question-answer turns per VQA conversation.

    Returns:
        ``{"out", "n", "files": [...written paths...], "seconds"}``.
    """
    from tqdm import tqdm

    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    if task not in ("t2i", "vqa", "both"):
        raise ValueError(f"unknown task {task!r}; expected 't2i', 'vqa' or 'both'")
    if fmt not in ("files", "wds", "both"):
        raise ValueError(f"unknown format {fmt!r}; expected 'files', 'wds' or 'both'")
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    if start < 0:
        raise ValueError(f"first scene index must be >= 0, got {start}")
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    world = ShapeWorld(size=size, seed=seed, holdout=holdout)  # checks size and seed
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} exists and is not a folder")
    taken = [name for name in EXPORT_NAMES if (out / name).exists()]
    if taken and not overwrite:
        raise ValueError(f"{str(out)!r} already holds an export ({', '.join(taken)}); choose another "
                         "folder or pass --overwrite to replace it")
    for name in taken:  # replace the old export whole: no stale images or shards stay behind
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    do_t2i, do_vqa = task in ("t2i", "both"), task in ("vqa", "both")
    do_files, do_wds = fmt in ("files", "both"), fmt in ("wds", "both")
    written: list[str] = []
    t0 = time.time()
    if do_files:
        (out / "images").mkdir(exist_ok=True)
        t2i_f = open(out / "t2i.jsonl", "w") if do_t2i else None
        vqa_f = open(out / "vqa.jsonl", "w") if do_vqa else None
        llava: list[dict[str, Any]] = []
    if do_wds:
        (out / "shards").mkdir(exist_ok=True)
    tar: tarfile.TarFile | None = None
    try:
        for k in tqdm(range(n), desc="export", unit="img", disable=not progress, file=sys.stderr):
            i = start + k
            key = f"{i:08d}"
            scene = world.sample(i)
            png = io.BytesIO()
            scene.render().save(png, format="PNG")
            png_bytes = png.getvalue()
            rec_t2i = rec_vqa = None
            if do_t2i:
                caption, style = world.caption_for(i, scene)
                rec_t2i = {"id": f"shapeworld-{key}", "index": i, "caption": caption, "style": style,
                           "captions": scene.captions, "objects": [o.to_dict() for o in scene.objects],
                           "background": scene.background, "size": size, "seed": seed}
            if do_vqa:
                conv, qtypes = world.conversation_for(i, scene, turns=turns)
                rec_vqa = {"id": f"shapeworld-{key}", "index": i, "conversations": conv, "qtypes": qtypes}
            if do_files:
                img_rel = f"images/{key}.png"
                (out / img_rel).write_bytes(png_bytes)
                if rec_t2i is not None:
                    t2i_f.write(json.dumps({**rec_t2i, "image": img_rel}) + "\n")
                if rec_vqa is not None:
                    vqa_f.write(json.dumps({**rec_vqa, "image": img_rel}) + "\n")
                    llava.append({"id": rec_vqa["id"], "image": img_rel,
                                  "conversations": rec_vqa["conversations"]})
            if do_wds:
                if k % shard_size == 0:
                    if tar is not None:
                        tar.close()
                    path = out / "shards" / f"shapeworld-{k // shard_size:06d}.tar"
                    tar = tarfile.open(path, "w")
                    written.append(str(path))
                _tar_add(tar, f"{key}.png", png_bytes, t0)
                meta: dict[str, Any] = {}
                if rec_t2i is not None:
                    _tar_add(tar, f"{key}.txt", rec_t2i["caption"].encode(), t0)
                    meta.update(rec_t2i)
                if rec_vqa is not None:
                    meta.update(rec_vqa)
                _tar_add(tar, f"{key}.json", json.dumps(meta).encode(), t0)
    finally:
        if tar is not None:
            tar.close()
        if do_files:
            for f in (t2i_f, vqa_f):
                if f is not None:
                    f.close()
    if do_files:
        written.append(str(out / "images"))
        if do_t2i:
            written.append(str(out / "t2i.jsonl"))
        if do_vqa:
            (out / "llava.json").write_text(json.dumps(llava))
            written += [str(out / "vqa.jsonl"), str(out / "llava.json")]
    return {"out": str(out), "n": n, "files": written, "seconds": time.time() - t0}


def run_export(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``harmon data export`` (returns the exit code)."""
    out = out or sys.stdout
    res = export(args.out, args.num, size=args.size, seed=args.seed, start=args.start, task=args.task,
                 fmt=args.format, shard_size=args.shard_size, progress=not args.no_progress,
                 holdout=not args.no_holdout, turns=args.turns, overwrite=args.overwrite)
    rate = res["n"] / max(res["seconds"], 1e-9)
    print(f"exported {res['n']} ShapeWorld samples ({args.size} px, seed {args.seed}) to {res['out']} "
          f"in {res['seconds']:.1f} s ({rate:.0f} samples/s)", file=out)
    for f in res["files"]:
        print(f"  {f}", file=out)
    return 0


def add_export_command(subparsers) -> argparse.ArgumentParser:
    """Add ``export`` to the ``harmon data`` subparsers; the handler is ``args.func(args)``."""
    from ..cli import examples

    p = subparsers.add_parser(
        "export", help="write ShapeWorld samples in the training formats",
        description="Write N ShapeWorld samples as image files + JSONL (t2i.jsonl, vqa.jsonl, llava.json) "
                    "and/or webdataset-style tar shards.",
        **examples("harmon data export --out data/sw -n 1000 --size 64",
                   "harmon data export --out data/sw_vqa -n 50000 --task vqa --turns 2 --format wds",
                   "harmon data export --out data/sw_eval -n 500 --seed 7 --no-holdout"))
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("-n", "--num", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels, 64..512 (default 128)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--start", type=int, default=0, help="first scene index (default 0)")
    p.add_argument("--task", choices=["t2i", "vqa", "both"], default="both")
    p.add_argument("--format", choices=["files", "wds", "both"], default="both")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default 1000)")
    p.add_argument("--turns", type=int, default=1, help="question-answer turns per VQA sample (default 1)")
    p.add_argument("--no-holdout", action="store_true",
                   help="also render the held-out colour-shape pairs (not for training data)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an export already in the output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_export)
    return p

"""Training speed and peak memory per stage, for the tiny and the 0.5B shapes (random weights).

Each (shape, stage) runs in a fresh process (so its peak memory is its own): it builds the
:class:`harmon.train.engine.Trainer` of that stage (what is frozen, resolution, one micro-batch of
every task the stage mixes, ShapeWorld data), runs warm-up steps, then times full optimiser steps
(forward, backward, clipping, AdamW) through the engine's own ``micro_step``.

- tokens/s counts the sequence positions the LLM processes (prompt + image positions + buffers);
- peak memory is the process's peak RSS on CPU (VmHWM) or ``max_memory_allocated`` on a GPU.

    python benchmarks/train_speed.py                       # tiny and 0.5B, stages I-III
    python benchmarks/train_speed.py --shapes tiny --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (preset, stage) -> image size; tiny follows the ShapeWorld configs, 0.5B the paper
SIZES = {"tiny": {1: 64, 2: 64, 3: 128}, "0.5b": {1: 256, 2: 256, 3: 512}}
RATIOS = {1: [0, 1, 1], 2: [1, 1, 1], 3: [1, 1, 1]}  # tasks present: stage I has no text
FROZEN = {1: ["llm"], 2: [], 3: []}


def run_one(shape: str, stage: int, steps: int, warmup: int, micro: int, device: str) -> dict:
    import torch

    from harmon.train.config import load_config
    from harmon.train.engine import Trainer, peak_memory_gb

    size = SIZES[shape][stage]
    tasks = [t for t, r in zip(("text", "i2t", "t2i"), RATIOS[stage]) if r]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, base={
            "stage": stage,
            "model": {"preset": "tiny" if shape == "tiny" else "harmon-0.5b"},
            "data": {"image_size": size, "ratio": RATIOS[stage],
                     "micro_batch": {"text": micro, "i2t": micro, "t2i": micro},
                     "max_prompt_tokens": 128,
                     "sources": [{"kind": "shapeworld", "task": t} for t in tasks]},
            "optim": {"frozen": FROZEN[stage]},
            "run": {"steps": warmup + steps, "out_dir": tmp, "progress": False,
                    "grad_checkpointing": shape != "tiny", "device": device,
                    "export_final": False}})
        t0 = time.time()
        tr = Trainer(cfg)
        tr.model.train()  # what Trainer.train() does first: dropout and checkpointing engage
        build_s = time.time() - t0
        it = iter(tr.loader)
        times, tokens = [], []
        G = 0
        for step in range(warmup + steps):
            if tr.dist.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.time()
            n_tok = 0
            for j in range(tr.accum):
                batch = next(it)
                n_tok += batch["tokens"]
                tr.micro_step(batch, G, last=j == tr.accum - 1)
                G += 1
            torch.nn.utils.clip_grad_norm_(tr.params, 1.0)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            if tr.dist.device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.time() - t)
                tokens.append(n_tok)
        step_s = sum(times) / len(times)
        return {"shape": shape, "stage": stage, "image_size": size, "tasks": tasks,
                "micro_batch": micro, "trainable_M": sum(tr.trainable_counts.values()) / 1e6,
                "grad_checkpointing": cfg.run.grad_checkpointing,
                "precision": "bf16" if tr.amp else "fp32", "device": str(tr.dist.device),
                "threads": torch.get_num_threads(), "steps_timed": steps,
                "step_s": step_s, "tokens_per_s": sum(tokens) / sum(times),
                "samples_per_s": micro * len(tasks) / step_s,
                "peak_mem_GiB": peak_memory_gb(tr.dist.device), "build_s": build_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,0.5b")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (tiny 5, 0.5b 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (tiny 2, 0.5b 0)")
    ap.add_argument("--micro", type=int, default=None, help="samples per micro-batch (tiny 8, 0.5b 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(HERE / "results" / "train_speed.json"))
    ap.add_argument("--one", nargs=2, metavar=("SHAPE", "STAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child process: one measurement, JSON on stdout
        shape, stage = args.one[0], int(args.one[1])
        print(json.dumps(run_one(shape, stage, args.steps, args.warmup, args.micro, args.device)))
        return

    rows = []
    for shape in args.shapes.split(","):
        steps = args.steps or (5 if shape == "tiny" else 1)
        warmup = args.warmup if args.warmup is not None else (2 if shape == "tiny" else 0)
        micro = args.micro or (8 if shape == "tiny" else 1)
        for stage in map(int, args.stages.split(",")):
            cmd = [sys.executable, __file__, "--one", shape, str(stage), "--steps", str(steps),
                   "--warmup", str(warmup), "--micro", str(micro), "--device", args.device]
            env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(f"{shape} stage {stage}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{shape:>5} stage {stage} {row['image_size']:>4}px  {'+'.join(row['tasks']):<13} "
                  f"trainable {row['trainable_M']:8.1f}M  step {row['step_s']:8.2f} s  "
                  f"{row['tokens_per_s']:9.0f} tok/s  {row['samples_per_s']:7.2f} samples/s  "
                  f"peak {row['peak_mem_GiB']:6.2f} GiB", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

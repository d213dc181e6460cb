"""Peak memory while loading a Harmon checkpoint in the official native layout.

Writes a random checkpoint of a preset (``harmon_X.pth`` without ``vae.`` keys + ``kl16.ckpt``
with a ``model`` entry) to a temporary directory, then loads it in a fresh process with
``harmon.checkpoints.load_harmon`` and reports the peak resident memory (ru_maxrss) against the
size of the weights in the target dtype. The loader builds the model on the meta device and
assigns memory-mapped tensors, so the target is peak RSS <= 1.25 x weights.

To be honest about memory-mapping (pages are only read when touched), the loading process also
reads every weight once (a checksum) before its peak is taken.

    python benchmarks/memory_load.py --preset harmon-1.5b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_checkpoint(preset: str, file_dtype: torch.dtype, out: Path) -> int:
    """Random weights in the native layout; returns the number of parameters written."""
    from harmon.checkpoints import expected_shapes
    from harmon.configs import preset as get_preset

    shapes = expected_shapes(get_preset(preset))
    g = torch.Generator().manual_seed(0)
    harmon, vae, n = {}, {}, 0
    for k, s in shapes.items():
        t = torch.empty(s, dtype=file_dtype).normal_(0, 0.02, generator=g)
        n += t.numel() if k != "llm.lm_head.weight" else 0
        (vae if k.startswith("vae.") else harmon)[k.removeprefix("vae.")] = t
    harmon["llm.lm_head.weight"] = harmon["llm.model.embed_tokens.weight"]  # tied, stored once
    torch.save(harmon, out / f"{preset}.pth")
    torch.save({"model": vae}, out / "kl16.ckpt")
    return n


def peak_rss() -> int:
    """Peak resident set of this process in bytes (VmHWM: unlike ru_maxrss, it is not inherited
    from the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_and_measure(path: Path, dtype: torch.dtype) -> dict:
    """Run in a fresh process: load, touch every weight, report peak RSS."""
    from harmon.checkpoints import load_harmon

    baseline = peak_rss()  # python + torch + harmon
    t0 = time.perf_counter()
    model = load_harmon(path, dtype=dtype)
    load_s = time.perf_counter() - t0
    peak_after_load = peak_rss()
    # summing in float32 without a float32 copy of each tensor
    checksum = sum(float(p.sum(dtype=torch.float32)) for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    return {"load_s": load_s, "baseline_rss": baseline, "peak_rss_after_load": peak_after_load,
            "peak_rss": peak_rss(),
            "num_params": n, "weights_bytes": n * torch.finfo(dtype).bits // 8,
            "checksum_finite": checksum == checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="harmon-1.5b")
    ap.add_argument("--file-dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="target dtype")
    ap.add_argument("--json", default=str(HERE / "results" / "memory_load.json"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(load_and_measure(Path(args._child), DTYPES[args.dtype])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_checkpoint(args.preset, DTYPES[args.file_dtype], Path(tmp))
        write_s = time.perf_counter() - t0
        file_bytes = sum(f.stat().st_size for f in Path(tmp).iterdir())
        cmd = [sys.executable, __file__, "--dtype", args.dtype, "--_child",
               str(Path(tmp) / f"{args.preset}.pth")]
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                        env=env).stdout.strip().splitlines()[-1])
    ratio = res["peak_rss"] / res["weights_bytes"]
    row = {"preset": args.preset, "file_dtype": args.file_dtype, "dtype": args.dtype,
           "params_M": res["num_params"] / 1e6, "weights_GiB": res["weights_bytes"] / 2 ** 30,
           "file_GiB": file_bytes / 2 ** 30, "peak_rss_GiB": res["peak_rss"] / 2 ** 30,
           "peak_rss_after_load_GiB": res["peak_rss_after_load"] / 2 ** 30,
           "baseline_rss_GiB": res["baseline_rss"] / 2 ** 30,
           "ratio": ratio, "target": 1.25, "ok": ratio <= 1.25, "load_s": res["load_s"],
           "write_s": write_s}
    print(f"{'preset':<12}{'file':>9}{'target':>9}{'params':>10}{'weights':>10}{'peak RSS':>10}"
          f"{'ratio':>7}{'load s':>8}")
    print(f"{row['preset']:<12}{row['file_dtype']:>9}{row['dtype']:>9}{row['params_M']:>9.0f}M"
          f"{row['weights_GiB']:>9.2f}G{row['peak_rss_GiB']:>9.2f}G{ratio:>7.3f}"
          f"{row['load_s']:>8.1f}")
    print(f"peak RSS / weights = {ratio:.3f} (target <= 1.25): {'OK' if row['ok'] else 'OVER'}; "
          f"of which {row['baseline_rss_GiB']:.2f} GiB is the interpreter with torch imported")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.is_file() else []
    rows = [r for r in rows if (r["preset"], r["file_dtype"], r["dtype"]) !=
            (row["preset"], row["file_dtype"], row["dtype"])] + [row]
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

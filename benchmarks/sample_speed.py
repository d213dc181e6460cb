"""Text-to-image sampling speed, reference vs fast engine, measured side by side.

Random weights of a preset's shapes (speed does not depend on the values), K steps with
guidance. For every (preset, size, batch) the same model runs every mode after a short warm-up
(which also compiles the compiled modes), then ``--repeats`` timed runs per mode, interleaved;
the fastest run of each mode is reported (the others are in the JSON). The table gives seconds per image, images/s, peak memory, the time split between the
LLM, the MAR encoder, the MAR decoder, the diffusion head and the VAE decoder, and the speed-up
over the reference measured in the same run. Both modes give the same tokens for the seed.

    python benchmarks/sample_speed.py                       # tiny and 0.5B at 256 and 512 px
    python benchmarks/sample_speed.py --presets tiny --sizes 256 --batches 1 8 --modes reference fast fast+compile
    python benchmarks/sample_speed.py --presets shipped --sizes 64 --batches 1 8   # the shipped model
    python benchmarks/sample_speed.py --presets shipped --sizes 64 --candidates 1 2 --modes fast

``shipped`` is the trained model inside the package (its own weights and tokenizer), the others
are random weights of a preset's shapes. ``--candidates``: images drawn per image returned, the
best kept by the model's own reading (``generate(candidates=...)``; default the model's own:
1 for the presets, 2 for the shipped model); the time per image includes the extra draws and
the reading.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from harmon.configs import preset
from harmon.fast.step import FastStep
from harmon.pipeline import Harmon, random_model, resolve_device
from harmon.tokenizer import byte_level_tokenizer

HERE = Path(__file__).resolve().parent


class Timer:
    """Wall time per component, via forward hooks (synchronising CUDA at each boundary)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals = defaultdict(float)
        self._start = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def attach(self, name: str, module: torch.nn.Module):
        def pre(mod, args):
            self._sync()
            self._start[name] = time.perf_counter()

        def post(mod, args, out):
            self._sync()
            self.totals[name] += time.perf_counter() - self._start[name]

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    @contextmanager
    def span(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.totals[name] += time.perf_counter() - t0


def instrument(model: Harmon, timer: Timer):
    """Time the components; returns a function that removes the instrumentation."""
    m = model.model
    handles = timer.attach("llm", m.llm.model) + timer.attach("vae_decoder", m.vae.decoder)
    original_encode, original_decode = m.mar.encode, m.mar.decode
    original_sample = m.mar.diffloss.sample
    fast_heads = list(model._fast_heads.values())
    original_fast = [h.sample for h in fast_heads]

    def encode(*a, **k):
        with timer.span("mar_encoder"):
            return original_encode(*a, **k)

    def decode(*a, **k):
        with timer.span("mar_decoder"):
            return original_decode(*a, **k)

    def sample(*a, **k):
        with timer.span("diffusion_head"):
            return original_sample(*a, **k)

    m.mar.encode, m.mar.decode, m.mar.diffloss.sample = encode, decode, sample
    # the fast engine runs its own LLM layers and decoder (FastStep), timed under the same names
    original_step = FastStep._llm, FastStep._decode_selected

    def fast_llm(self, *a, **k):
        with timer.span("llm"):
            return original_step[0](self, *a, **k)

    def fast_decode(self, *a, **k):
        with timer.span("mar_decoder"):
            return original_step[1](self, *a, **k)

    FastStep._llm, FastStep._decode_selected = fast_llm, fast_decode
    for h, orig in zip(fast_heads, original_fast):
        def fast_sample(*a, _orig=orig, **k):
            with timer.span("diffusion_head"):
                return _orig(*a, **k)
        h.sample = fast_sample

    def restore():
        for h in handles:
            h.remove()
        del m.mar.encode, m.mar.decode, m.mar.diffloss.sample
        for h in fast_heads:
            del h.sample
        FastStep._llm, FastStep._decode_selected = original_step
    return restore


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


MODES = {"reference": dict(mode="reference"), "fast": dict(mode="fast"),
         "fast+compile": dict(mode="fast", compile=True),
         # approximations (not the reference's output; their quality: benchmarks/approx_quality.py)
         "fast+head50": dict(mode="fast", head_steps=50),
         "fast+head25": dict(mode="fast", head_steps=25),
         "fast+ddim25": dict(mode="fast", head_steps=25, head_sampler="ddim")}


def bench(model: Harmon, name: str, size: int, batch: int, steps: int, mode: str, device,
          dtype, candidates: int) -> dict:
    """One timed generation of ``batch`` images, each the best of ``candidates`` (after
    ``warm_up``)."""
    prompts = [f"a red circle number {i}" for i in range(batch)]
    timer = Timer(device)
    restore = instrument(model, timer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model.generate(prompts, size=size, steps=steps, seed=0, candidates=candidates, **MODES[mode])
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    restore()
    return {"preset": name, "size": size, "batch": batch, "steps": steps, "mode": mode,
            "candidates": candidates,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "seconds": total, "s_per_image": total / batch, "images_per_s": batch / total,
            "peak_memory_GiB": peak_memory(device),
            "breakdown_s": {k: round(v, 4) for k, v in sorted(timer.totals.items())}}


def warm_up(model: Harmon, size: int, batch: int, mode: str, candidates: int) -> float:
    """Allocations, and for compiled modes the compilation; returns its seconds."""
    prompts = [f"a red circle number {i}" for i in range(batch)]
    t0 = time.perf_counter()
    model.generate(prompts, size=size, steps=2, seed=0, candidates=candidates, **MODES[mode])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "harmon-0.5b"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per mode, interleaved; the fastest is reported")
    ap.add_argument("--modes", nargs="+", default=["reference", "fast"], choices=list(MODES))
    ap.add_argument("--candidates", nargs="+", type=int, default=None,
                    help="best of N draws per image (default: the model's own, harmon info)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default fp32 on CPU, bf16 on GPU")
    ap.add_argument("--json", default=str(HERE / "results" / "sample_speed.json"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype] or (
        torch.float32 if device.type == "cpu" else torch.bfloat16)
    torch.set_grad_enabled(False)
    rows = []
    header = (f"{'preset':<13}{'size':>5}{'batch':>6}{'best of':>8}{'mode':>14}{'s/image':>9}"
              f"{'img/s':>8}{'peak GiB':>9}{'speed-up':>9}  breakdown (s)")
    print(header)
    for name in args.presets:
        if name == "shipped":
            model = Harmon.from_pretrained(device=device, dtype=dtype)
        else:
            model = Harmon(random_model(preset(name)).to(device=device, dtype=dtype),
                           byte_level_tokenizer(), name=name, trained=False)
        for size, batch, cands in itertools.product(
                args.sizes, args.batches, args.candidates or [model.sampling["candidates"]]):
            warm = {mode: warm_up(model, size, batch, mode, cands) for mode in args.modes}
            runs = {mode: [] for mode in args.modes}
            for _ in range(args.repeats):  # interleaved, so that drift hits every mode
                for mode in args.modes:
                    runs[mode].append(bench(model, name, size, batch, args.steps, mode,
                                            device, dtype, cands))
            base = None
            for mode in args.modes:
                r = min(runs[mode], key=lambda r: r["seconds"])  # the least disturbed run
                r["repeats_s_per_image"] = [round(x["s_per_image"], 4) for x in runs[mode]]
                r["warm_up_s"] = round(warm[mode], 2)
                base = base or (r["s_per_image"] if mode == "reference" else None)
                r["speedup_vs_reference"] = base / r["s_per_image"] if base else None
                rows.append(r)
                parts = " ".join(f"{k}={v:.2f}" for k, v in r["breakdown_s"].items())
                up = f"{r['speedup_vs_reference']:.2f}x" if base else "-"
                print(f"{name:<13}{size:>5}{batch:>6}{cands:>8}{mode:>14}{r['s_per_image']:>9.2f}"
                      f"{r['images_per_s']:>8.3f}{r['peak_memory_GiB']:>9.2f}{up:>9}  {parts}",
                      flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

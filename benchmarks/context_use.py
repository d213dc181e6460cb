"""How much a trained generator uses what it sees: the masked diffusion loss on a fixed set of
tokens, as the rest of the image is revealed, with and without the caption.

A model that has learned images' layout predicts a token much better when its neighbours are
visible; one that has learned only global statistics (the background) gains from the first
visible tokens and then no more. ShapeWorld scenes (seed 7), 30% of each image's tokens scored,
the same noise and timesteps for every row of the table.

    python benchmarks/context_use.py                           # the shipped model
    python benchmarks/context_use.py --checkpoint runs/shapeworld_model_stage2/final
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from harmon import Harmon
from harmon.data.shapeworld import ShapeWorld
from harmon.rng import TorchDraws
from harmon.train.vae import shapeworld_batch

HERE = Path(__file__).resolve().parent
VISIBLE = (0.7, 0.3, 0.1, 0.0)  # fraction of the tokens the model sees
SCORED = 0.3  # fraction of the tokens whose loss is measured (never visible)


def scenes(n: int, size: int):
    """(n, 3, size, size) images in [-1, 1] and their short captions."""
    world = ShapeWorld(size=size, seed=7)
    return shapeworld_batch(world, 0, n), [world.sample(i).caption("short") for i in range(n)]


@torch.no_grad()
def context_table(model: Harmon, n_images: int = 32, repeats: int = 4, seed: int = 0) -> list[dict]:
    m = model.model.eval()
    pixels, captions = scenes(n_images, model.cfg.image_size)
    tokens = m.encode_images(pixels.to(model.device, m.vae_dtype())).to(m.dtype)
    B, N, C = tokens.shape
    grid = m.grid_for(pixels.shape[-2], pixels.shape[-1])
    g = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(N, generator=g) for _ in range(B)]).to(model.device)
    scored = torch.zeros(B, N, device=model.device)
    scored.scatter_(1, orders[:, :int(N * SCORED)], 1.0)
    prompts = {"caption": captions, "none": ["Generate an image."] * B}
    rows = []
    for visible in VISIBLE:
        masked = torch.zeros(B, N, device=model.device)
        masked.scatter_(1, orders[:, :N - int(math.floor(N * visible))], 1.0)
        row = {"visible": visible}
        for name, texts in prompts.items():
            ids, attn = model._prompt_batch(texts, 1, False)[:2]
            z = m.t2i_condition(tokens, masked, grid, m.embed_text(ids), attn)
            losses = [float(m.mar.diffloss(tokens.reshape(B * N, C), z.reshape(B * N, -1),
                                           scored.reshape(B * N),
                                           TorchDraws(torch.Generator(model.device).manual_seed(r))))
                      for r in range(repeats)]
            row[f"loss_{name}"] = float(np.mean(losses))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model directory (default: the shipped one)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=str(HERE / "results" / "context_use.json"))
    args = ap.parse_args()
    model = Harmon.from_pretrained(args.checkpoint, device=args.device)
    rows = context_table(model, args.images)
    print(f"{model.name}: masked diffusion loss on {SCORED:.0%} of the tokens of {args.images} scenes")
    print(f"{'visible':>8} {'with caption':>13} {'no caption':>11}")
    for r in rows:
        print(f"{r['visible']:>8.0%} {r['loss_caption']:>13.4f} {r['loss_none']:>11.4f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": model.name, "provenance": model.provenance,
                                           "images": args.images, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

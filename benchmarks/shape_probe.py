"""Where shape identity is lost: probes trained to tell which of the 7 ShapeWorld shapes an
image holds, from the VAE latents and from the LLM's image inputs (the shared encoder's output).

Each probe is a fresh network trained on the frozen features of `--scenes` ShapeWorld scenes
(seed 999, never trained on) and scored on the last 10% of them: per-shape presence accuracy
(majority: always answer the more frequent of present / absent for each shape) and the share of
scenes whose 7 answers are all right.

- conv: three 3 x 3 convolutions over the latent grid and a max over positions, the local
  inductive bias a shape spread over 2 x 2 latents needs;
- transformer: two pre-norm attention blocks of width 128 with learned positions and a class
  token, the inductive bias of the MAR encoder and the LLM.

A transformer that does much worse on the LLM inputs than on the latents says that the encoder
has not formed shape features; one that does much worse than the conv probe on the same latents
says that learning them by attention needs far more data than a convolution.

    python benchmarks/shape_probe.py                    # the shipped model (~9 min on 2 cores)
    python benchmarks/shape_probe.py --checkpoint runs/shapeworld_model_stage5/final
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from harmon import Harmon
from harmon.data.shapeworld import SHAPE_NAMES, ShapeWorld
from harmon.train.data import pad_square
from harmon.understand import image_embeddings

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def features(model: Harmon, n: int, batch: int = 250):
    """``(latents (n, C, h, w), llm_inputs (n, L, H), labels (n, 7))`` for ShapeWorld scenes
    0..n-1 of seed 999; features scaled to unit standard deviation, labels 1 where the shape is
    present (order of ``SHAPE_NAMES``)."""
    m, size = model.model, model.cfg.image_size
    world = ShapeWorld(size=size, seed=999)
    h, w = m.grid_for(size)
    lat, emb, labels = [], [], []
    for s0 in range(0, n, batch):
        scenes = [world.sample(i) for i in range(s0, min(n, s0 + batch))]
        px = torch.stack([pad_square(s.render(), size) for s in scenes]).to(model.device)
        tokens = m.encode_images(px.to(m.vae_dtype()))  # (B, h * w, C), row-major
        lat.append(tokens.float().transpose(1, 2).reshape(len(scenes), -1, h, w).cpu())
        emb.append(image_embeddings(m, px).float().cpu())
        labels += [[float(any(o.shape == s for o in sc.objects)) for s in SHAPE_NAMES]
                   for sc in scenes]
    lat, emb = torch.cat(lat), torch.cat(emb)
    return lat / lat.std(), emb / emb.std(), torch.tensor(labels)


class ConvProbe(nn.Module):
    """(B, C, h, w) -> (B, 7) presence logits."""

    def __init__(self, c_in: int, width: int = 96, n_out: int = len(SHAPE_NAMES)):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(width, n_out, 1))

    def forward(self, x):
        return self.convs(x).amax(dim=(2, 3))  # present anywhere


class TransformerProbe(nn.Module):
    """(B, L, D) -> (B, 7) presence logits, read from a class token."""

    def __init__(self, d_in: int, length: int, width: int = 128, depth: int = 2,
                 n_out: int = len(SHAPE_NAMES)):
        super().__init__()
        self.proj = nn.Linear(d_in, width)
        self.pos = nn.Parameter(0.5 * torch.randn(1, length, width))
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(width, n_out)

    def forward(self, x):
        h = self.proj(x) + self.pos
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1)
        return self.out(self.blocks(h)[:, 0])


def fit_probe(net: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int, lr: float = 1e-3,
              batch: int = 128, seed: int = 0) -> dict[str, float]:
    """Train ``net`` on the first 90% of ``(x, y)`` (binary cross-entropy, AdamW) and score it on
    the rest: ``{"accuracy", "all_right", "train_loss", "seconds"}``."""
    g = torch.Generator().manual_seed(seed)
    n_train = int(0.9 * len(x))
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=0.01)
    t0, loss = time.perf_counter(), torch.tensor(float("nan"))
    for _ in range(iters):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        loss = F.binary_cross_entropy_with_logits(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = _scores((net(x[n_train:]) > 0).float(), y[n_train:])
    return {**scores, "train_loss": loss.item(), "seconds": time.perf_counter() - t0}


def majority(y: torch.Tensor) -> dict[str, float]:
    """Held-out ``{"accuracy", "all_right"}`` of answering each shape's more frequent training
    label."""
    n_train = int(0.9 * len(y))
    return _scores((y[:n_train].mean(0, keepdim=True) > 0.5).float(), y[n_train:])


def _scores(guess: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    # guess broadcasts against y (n, 7): per-shape accuracy and the share of rows wholly right
    right = guess == y
    return {"accuracy": float(right.float().mean()), "all_right": float(right.all(1).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model directory (default: the shipped one)")
    ap.add_argument("--scenes", type=int, default=10000)
    ap.add_argument("--conv-iters", type=int, default=1000)
    ap.add_argument("--transformer-iters", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=str(HERE / "results" / "shape_probe.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Harmon.from_pretrained(args.checkpoint, device=args.device)
    lat, emb, y = features(model, args.scenes)
    rows = [("majority answer", "-", majority(y))]
    rows.append(("conv", "VAE latents", fit_probe(ConvProbe(lat.shape[1]), lat, y, args.conv_iters,
                                                         lr=2e-3)))
    seq = lat.flatten(2).transpose(1, 2)  # (n, h * w, C)
    rows.append(("transformer", "VAE latents",
                 fit_probe(TransformerProbe(seq.shape[-1], seq.shape[1]), seq, y, args.transformer_iters)))
    rows.append(("transformer", "LLM image inputs",
                 fit_probe(TransformerProbe(emb.shape[-1], emb.shape[1]), emb, y, args.transformer_iters)))
    print(f"{model.name}: shape presence from {args.scenes} scenes (10% held out)")
    print(f"{'probe':>16} {'features':>17} {'accuracy':>9} {'all 7 right':>12}")
    for probe, feats, r in rows:
        print(f"{probe:>16} {feats:>17} {r['accuracy']:>9.3f} {r['all_right']:>12.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "model": model.name, "provenance": model.provenance, "scenes": args.scenes,
        "conv_iters": args.conv_iters, "transformer_iters": args.transformer_iters,
        "rows": [{"probe": p, "features": f, **r} for p, f, r in rows]}, indent=1))


if __name__ == "__main__":
    main()

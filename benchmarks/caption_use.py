"""Which words of a prompt the generator uses: the masked diffusion loss of a scene's object
tokens under its true caption against the same caption with one thing changed.

For ShapeWorld scenes of two objects in a clear relation ("a circle to the left of a square",
"a red circle and a blue square"), the loss of the tokens inside the objects is measured with
the true caption and with

- ``relation``: the relation turned round ("... to the right of ...");
- ``colours swapped``: each object given the other's colour (the same words, bound wrongly);
- ``shape``: the first object's shape replaced by one not in the scene;
- ``colour``: the first object's colour replaced by one not in the scene;
- ``region``: in the detailed caption ("a white diamond at the top right and a green circle at
  the bottom right on a ... background"), one object's place mirrored through the centre;
- ``no caption``: the unconditional prompt the generator learned with caption dropout.

The same tokens, masks, timesteps and noise for every caption of a scene, so each scene gives a
paired comparison. A generator that reads a kind of word loses more under the wrong one: the
table gives both losses and the share of scenes whose true caption scores better (0.5 = the
word is ignored). With nothing of the image visible the words decide everything; with half of
it visible, where the objects are is partly given.

Then where the words get lost: linear probes on what the LLM hands the generator (its outputs
at the buffer positions, before the connector, nothing of the image visible) for the judge's
position prompts ("a circle to the left of a square", every shape pair and relation), trained on
70% of them and scored on the rest: the relation word, each shape, and their binding (which
shape goes on the left or on top).

    python benchmarks/caption_use.py                           # the shipped model
    python benchmarks/caption_use.py --checkpoint runs/shapeworld_model_stage2/final
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from harmon import Harmon
from harmon.data.shapes import COLOR_NAMES, OPPOSITE_RELATION, RELATIONS, SHAPE_NAMES
from harmon.data.shapeworld import _REGIONS, ShapeWorld, noun_phrase
from harmon.train.vae import scene_pixels

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from context_use import object_cells_of, prompt_ids, scored_losses  # noqa: E402

VISIBLE = (0.0, 0.5)  # fraction of the tokens the generator sees (never a scored one)
TESTS = ("relation", "colours swapped", "shape", "colour", "region", "no caption")
PLACE_PHRASE = dict(_REGIONS)  # "top left" -> "at the top left", as the detailed caption says it


def related_pairs(n: int, size: int, seed: int = 7) -> list:
    """The first ``n`` scenes of a ShapeWorld (``seed``) that hold two objects of different
    colours in a clear relation, not both in the centre cell."""
    world = ShapeWorld(size=size, seed=seed)
    out, i = [], 0
    while len(out) < n:
        s = world.sample(i)
        i += 1
        if len(s.objects) == 2 and s.relation is not None \
                and s.objects[0].color != s.objects[1].color \
                and any(o.region != "center" for o in s.objects):
            out.append(s)
    return out


def captions(scene) -> dict[str, tuple[str | None, str | None]]:
    """``{test: (true caption, changed caption)}`` for one scene; None = the unconditional
    prompt. The other shape and colour are the first in the palette not in the scene."""
    i, rel, j = scene.relation
    a, b = scene.objects[i], scene.objects[j]
    shape = next(s for s in SHAPE_NAMES if s not in (a.shape, b.shape))
    colour = next(c for c in COLOR_NAMES if c not in (a.color, b.color))

    def placed(sa: str, r: str) -> str:
        return f"{noun_phrase(sa)} {RELATIONS[r]} {noun_phrase(b.shape)}"

    def coloured(ca: str, cb: str, sa: str = a.shape) -> str:
        return f"{noun_phrase(sa, ca)} and {noun_phrase(b.shape, cb)}"

    o = a if a.region != "center" else b
    words = " ".join(w for w in (o.size_word, o.color, o.shape) if w)
    mirror = " ".join({"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
                      .get(w, w) for w in o.region.split())
    detailed = scene.captions["detailed"]
    moved = detailed.replace(f"{words} {PLACE_PHRASE[o.region]}",
                             f"{words} {PLACE_PHRASE[mirror]}", 1)

    return {"relation": (placed(a.shape, rel), placed(a.shape, OPPOSITE_RELATION[rel])),
            "colours swapped": (coloured(a.color, b.color), coloured(b.color, a.color)),
            "shape": (placed(a.shape, rel), placed(shape, rel)),
            "colour": (coloured(a.color, b.color), coloured(colour, b.color)),
            "region": (detailed, moved),
            "no caption": (coloured(a.color, b.color), None)}


@torch.no_grad()
def caption_table(model: Harmon, n_scenes: int = 48, repeats: int = 4, seed: int = 0) -> list[dict]:
    """One row per (test, visible share): mean object-token loss under the true and the changed
    caption, and the share of scenes whose true caption has the lower loss."""
    m = model.model.eval()
    scenes = related_pairs(n_scenes, model.cfg.image_size)
    pixels = scene_pixels(scenes).to(model.device)
    tokens = m.encode_images(pixels.to(m.vae_dtype())).to(m.dtype)
    B, N, _ = tokens.shape
    grid = m.grid_for(pixels.shape[-2], pixels.shape[-1])
    cells = object_cells_of(scenes, grid).to(model.device)
    per_scene = {k: cells * (torch.arange(B, device=model.device) == k)[:, None].to(cells)
                 for k in range(B)}
    g = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(N, generator=g) for _ in range(B)]).to(model.device)
    caps = [captions(s) for s in scenes]
    rows = []
    for visible in VISIBLE:
        masked = torch.ones(B, N, device=model.device)
        # the visible tokens are drawn among those outside the objects' cores, so every scored
        # token stays masked
        for k in range(B):
            outside = [int(t) for t in orders[k] if cells[k, t] == 0][:int(visible * N)]
            masked[k, outside] = 0
        for test in TESTS:
            losses = {}
            for which in (0, 1):
                ids, attn = prompt_ids(model, [c[test][which] for c in caps])
                losses[which] = scored_losses(m, tokens, tokens, masked, grid, m.embed_text(ids),
                                              attn, per_scene, repeats)
            true = np.array([losses[0][k] for k in range(B)])
            changed = np.array([losses[1][k] for k in range(B)])
            rows.append({"test": test, "visible": visible, "scenes": B,
                         "loss_true": float(true.mean()), "loss_changed": float(changed.mean()),
                         "true_better": float((true < changed).mean())})
    return rows


@torch.no_grad()
def buffer_features(model: Harmon, texts: list[str], batch: int = 64) -> torch.Tensor:
    """(len(texts), buffers x H): the LLM's outputs at the buffer positions for each prompt,
    nothing of the image visible (the first sampling step), standardised per feature."""
    m = model.model.eval()
    seen = {}
    hook = m.proj_out.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    feats = []
    try:
        grid = (m.cfg.mar.seq_h, m.cfg.mar.seq_h)
        for k in range(0, len(texts), batch):
            part = texts[k:k + batch]
            ids, attn = prompt_ids(model, part)
            z = torch.zeros(len(part), grid[0] * grid[1], m.cfg.mar.token_dim,
                            device=model.device, dtype=m.dtype)
            m.t2i_condition(z, torch.ones(z.shape[:2], device=model.device, dtype=m.dtype), grid,
                            m.embed_text(ids), attn)
            # the connector's input is in MAR order, buffers first (nothing else is visible)
            feats.append(seen["x"][:, :m.num_buffers].flatten(1).float().cpu())
    finally:
        hook.remove()
    x = torch.cat(feats)
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: float = 0.7, steps: int = 300) -> float:
    """Held-out accuracy of a linear softmax probe (Adam, light L2) trained on the first
    ``train`` share of the rows (x (n, d), labels y (n,))."""
    cut = int(train * len(y))
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[:cut] @ w, y[:cut]) + 1e-3 * w.pow(2).sum()
            loss.backward()
            opt.step()
    return float(((x[cut:] @ w).argmax(1) == y[cut:]).float().mean())


def binding_probe(model: Harmon, seed: int = 0) -> list[dict]:
    """Probe rows (what, held-out accuracy, chance) over every "a X <relation> a Y" prompt."""
    rels = list(RELATIONS)
    items = [(a, r, b) for a in SHAPE_NAMES for b in SHAPE_NAMES if a != b for r in rels]
    random.Random(seed).shuffle(items)
    x = buffer_features(model, [f"{noun_phrase(a)} {RELATIONS[r]} {noun_phrase(b)}"
                                for a, r, b in items])
    targets = {"relation": [rels.index(r) for _, r, _ in items],
               "first shape": [SHAPE_NAMES.index(a) for a, _, _ in items],
               "second shape": [SHAPE_NAMES.index(b) for _, _, b in items],
               "shape on the left or top": [SHAPE_NAMES.index(a if r in ("left of", "above") else b)
                                            for a, r, b in items]}
    return [{"what": k, "prompts": len(items), "accuracy": probe_accuracy(x, torch.tensor(v)),
             "chance": 1 / len(set(v))} for k, v in targets.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model directory (default: the shipped one)")
    ap.add_argument("--scenes", type=int, default=48)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=str(HERE / "results" / "caption_use.json"))
    args = ap.parse_args()
    model = Harmon.from_pretrained(args.checkpoint, device=args.device)
    rows = caption_table(model, args.scenes)
    print(f"{model.name}: loss of object tokens, true caption against a changed one "
          f"({args.scenes} two-object scenes)")
    print(f"{'changed':>16} {'visible':>8} {'true':>8} {'changed':>8} {'true better':>12}")
    for r in rows:
        print(f"{r['test']:>16} {r['visible']:>8.0%} {r['loss_true']:>8.4f} "
              f"{r['loss_changed']:>8.4f} {r['true_better']:>12.2f}")
    probes = binding_probe(model)
    print(f"linear probes on the LLM's buffer outputs, {probes[0]['prompts']} position prompts "
          "(held out: 30%)")
    print(f"{'what':>26} {'accuracy':>9} {'chance':>7}")
    for r in probes:
        print(f"{r['what']:>26} {r['accuracy']:>9.3f} {r['chance']:>7.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": model.name, "provenance": model.provenance,
                                           "scenes": args.scenes, "rows": rows,
                                           "binding_probe": probes}, indent=1))


if __name__ == "__main__":
    main()

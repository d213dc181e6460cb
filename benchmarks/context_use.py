"""How much a trained generator uses what it sees: the masked diffusion loss on a fixed set of
tokens, as the rest of the image is revealed, with and without the caption.

A model that has learned images' layout predicts a token much better when its neighbours are
visible; one that has learned only global statistics (the background) gains from the first
visible tokens and then no more. ShapeWorld scenes (seed 7), 30% of each image's tokens scored,
the same noise and timesteps for every row of the table. Most scored tokens are background
(noise texture, unpredictable past its colour), so the loss is also reported on the scored
tokens that lie inside an object: those a layout-aware model predicts from their neighbours.
Two more measures follow: the error of object tokens the head *draws* (one step, 0-80% of the
image visible) against the error of another scene's object token, and how much the decoder's
first block attends to visible tokens near a masked one; how much the loss grows when the
visible tokens carry errors, as the generator's own draws do. Last, how often an object token the
head draws takes another colour than its object's, by how much of the object the model sees.

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
from harmon.models.harmon import median_colour, off_background
from harmon.rng import TorchDraws
from harmon.tokenizer import pad_ids
from harmon.train.vae import shapeworld_batch

HERE = Path(__file__).resolve().parent
VISIBLE = (0.7, 0.3, 0.1, 0.0)  # fraction of the tokens the model sees
SCORED = 0.3  # fraction of the tokens whose loss is measured (never visible)


def scenes(n: int, size: int):
    """(n, 3, size, size) images in [-1, 1] and their short captions."""
    world = ShapeWorld(size=size, seed=7)
    return shapeworld_batch(world, 0, n), [world.sample(i).caption("short") for i in range(n)]


def object_cells(n: int, grid: tuple[int, int]) -> torch.Tensor:
    """(n, h*w) 1 where a token's cell centre lies in an object's core, the scenes of
    :func:`scenes` (see :func:`object_cells_of`)."""
    world = ShapeWorld(size=64, seed=7)  # only geometry is read: normalised, independent of size
    return object_cells_of([world.sample(i) for i in range(n)], grid)


def object_cells_of(scenes, grid: tuple[int, int]) -> torch.Tensor:
    """(len(scenes), h*w) 1 where a token's cell centre lies in an object's core (within 0.3
    diameters of its centre: inside every shape's outline), else 0."""
    h, w = grid
    cy, cx = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    cells = torch.zeros(len(scenes), h * w)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            inside = torch.hypot(cx - o.x, cy - o.y) < 0.3 * o.diameter
            cells[i] = torch.maximum(cells[i], inside.flatten().float())
    return cells


def prompt_ids(model: Harmon, texts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded generation prompts (B, L) and their 0/1 mask; None = the unconditional
    prompt (the one caption dropout trains, not "Generate an image: ..." around a caption)."""
    tok = model.tokenizer
    rows = [tok.unconditional_ids() if t is None else tok.generation_ids(t) for t in texts]
    ids, mask = pad_ids(rows, tok.pad_id)
    return ids.to(model.device), mask.to(model.device)


def encoded_scenes(model: Harmon, n: int):
    """The scenes of :func:`scenes` as the model sees them: (network in eval mode, latent tokens
    (n, N, 16), token grid, caption ids, caption mask, the images (n, 3, S, S))."""
    m = model.model.eval()
    pixels, captions = scenes(n, model.cfg.image_size)
    tokens = m.encode_images(pixels.to(model.device, m.vae_dtype())).to(m.dtype)
    grid = m.grid_for(pixels.shape[-2], pixels.shape[-1])
    ids, attn = prompt_ids(model, captions)
    return m, tokens, grid, ids, attn, pixels


def scored_tokens(g: torch.Generator, B: int, N: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random order of each row's N tokens (B, N), drawn from ``g``, and the (B, N) 0/1 mask
    of the first :data:`SCORED` of them: the tokens whose loss is measured (masked last, so
    never visible)."""
    orders = torch.stack([torch.randperm(N, generator=g) for _ in range(B)]).to(device)
    scored = torch.zeros(B, N, device=device)
    scored.scatter_(1, orders[:, :int(N * SCORED)], 1.0)
    return orders, scored


@torch.no_grad()
def context_table(model: Harmon, n_images: int = 32, repeats: int = 4, seed: int = 0) -> list[dict]:
    m = model.model.eval()
    pixels, captions = scenes(n_images, model.cfg.image_size)
    tokens = m.encode_images(pixels.to(model.device, m.vae_dtype())).to(m.dtype)
    B, N, _ = tokens.shape
    grid = m.grid_for(pixels.shape[-2], pixels.shape[-1])
    orders, scored = scored_tokens(torch.Generator().manual_seed(seed), B, N, model.device)
    scored_objects = scored * object_cells(B, grid).to(model.device)
    prompts = {"caption": captions, "none": [None] * B}
    rows = []
    for visible in VISIBLE:
        masked = torch.zeros(B, N, device=model.device)
        masked.scatter_(1, orders[:, :N - int(math.floor(N * visible))], 1.0)
        row = {"visible": visible}
        for name, texts in prompts.items():
            ids, attn = prompt_ids(model, texts)
            which = {"": scored} if name == "none" else {"": scored, "_objects": scored_objects}
            losses = scored_losses(m, tokens, tokens, masked, grid, m.embed_text(ids), attn, which,
                                   repeats)
            row.update({f"loss_{name}{suffix}": v for suffix, v in losses.items()})
        rows.append(row)
    return rows


def scored_losses(m, context: torch.Tensor, target: torch.Tensor, masked: torch.Tensor,
                  grid: tuple[int, int], embeds: torch.Tensor, attn: torch.Tensor,
                  weights: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Mean masked diffusion loss of ``target`` (B, N, C) under each of ``weights`` ((B, N)
    each), the generator seeing ``context`` (B, N, C) where ``masked`` (B, N) is 0; the same
    seeds for every call, so every caller's columns see the same timesteps and noise."""
    B, N, C = target.shape
    z = m.t2i_condition(context, masked, grid, embeds, attn)
    # the head's loss of every token once per seed, then weighed each way
    rows = [m.mar.diffloss(target.reshape(B * N, C), z.reshape(B * N, -1),
                           draws=TorchDraws(torch.Generator(target.device).manual_seed(r)),
                           per_row=True) for r in range(repeats)]
    return {key: float(np.mean([float((loss * w.reshape(B * N)).sum() / w.sum())
                                for loss in rows])) for key, w in weights.items()}


#: Std of the Gaussian noise on the visible tokens in :func:`noisy_context_table`, in units of the
#: scaled latents (unit variance).
CONTEXT_NOISE = (0.0, 0.05, 0.1, 0.2, 0.5)


@torch.no_grad()
def noisy_context_table(model: Harmon, n_images: int = 48, visible: float = 0.7,
                        repeats: int = 3, seed: int = 0) -> list[dict]:
    """How much the generator is thrown by errors in what it sees: the loss of :func:`context_table`
    (caption given, ``visible`` of the image shown) when the visible tokens carry Gaussian noise
    of each std in :data:`CONTEXT_NOISE`, and when they are the autoencoder's round trip
    (decoded, then encoded again: errors of the size and kind a decoder and encoder make, about
    0.08 rms on true scenes). At sampling time the visible tokens are the generator's own draws,
    never exact; a generator whose loss doubles at small noise reads them too literally."""
    m, tokens, grid, ids, attn, _ = encoded_scenes(model, n_images)
    B, N, _ = tokens.shape
    g = torch.Generator().manual_seed(seed)
    orders, scored = scored_tokens(g, B, N, model.device)
    masked = torch.zeros(B, N, device=model.device)
    masked.scatter_(1, orders[:, :N - int(math.floor(N * visible))], 1.0)
    weights = {"all": scored, "objects": scored * object_cells(B, grid).to(model.device)}
    noise = torch.randn(tokens.shape, generator=g).to(tokens)
    contexts = {f"noise {s:g}": tokens + s * noise for s in CONTEXT_NOISE}
    contexts["round trip"] = m.encode_images(m.decode_tokens(tokens, grid).clamp(-1, 1))
    embeds = m.embed_text(ids)
    return [{"context": name, **scored_losses(m, c, tokens, masked, grid, embeds, attn, weights,
                                              repeats)} for name, c in contexts.items()]


@torch.no_grad()
def inpainting_error(model: Harmon, n_images: int = 48, per_image: int = 3,
                     visible: tuple[float, ...] = (0.0, 0.3, 0.8), seed: int = 0) -> list[dict]:
    """Sampled-token error on object tokens: ``per_image`` object-core tokens of each scene are
    masked and drawn once by the head (no guidance, temperature 1) while a ``visible`` fraction of
    the other tokens is shown. A generator that reads neighbours gets close to the truth with 80%
    of the image visible; ``shuffled`` is the error of another scene's object token (a draw that
    knows nothing of this image)."""
    m, tokens, grid, ids, attn, _ = encoded_scenes(model, n_images)
    B, N, C = tokens.shape
    cells = object_cells(B, grid)
    rows = []
    for v in visible:
        g = torch.Generator().manual_seed(seed)
        scored, masked = torch.zeros(B, N), torch.ones(B, N)
        for i in range(B):
            obj = cells[i].nonzero().flatten()
            scored[i, obj[torch.randperm(len(obj), generator=g)[:per_image]]] = 1
            rest = (scored[i] == 0).nonzero().flatten()
            masked[i, rest[torch.randperm(len(rest), generator=g)[:int(v * N)]]] = 0
        keep = scored.bool().to(model.device)
        z = m.t2i_condition(tokens, masked.to(model.device), grid, m.embed_text(ids), attn)
        draws = TorchDraws(torch.Generator(model.device).manual_seed(seed + 1))
        sampled = m.mar.diffloss.sample(z[keep], 1.0, 1.0, draws)
        truth = tokens[keep]
        shuffled = truth[torch.randperm(len(truth), generator=g).to(model.device)]
        rows.append({"visible": v, "tokens": len(truth),
                     "mse": float((sampled - truth).pow(2).mean()),
                     "mse_shuffled": float((shuffled - truth).pow(2).mean())})
    return rows


@torch.no_grad()
def attention_by_distance(model: Harmon, n_images: int = 32, visible: float = 0.3,
                          seed: int = 0) -> dict[int, float]:
    """How much the decoder's first block looks at nearby visible tokens: the attention a masked
    token gives a visible token at Chebyshev grid distance d, as a multiple of an even share over
    the visible tokens (heads averaged; 1 = position-blind)."""
    m, tokens, grid, ids, attn, _ = encoded_scenes(model, n_images)
    B, N, _ = tokens.shape
    g = torch.Generator().manual_seed(seed)
    masked = torch.ones(B, N)
    for i in range(B):
        masked[i, torch.randperm(N, generator=g)[:int(visible * N)]] = 0
    block = m.mar.decoder_blocks[0]
    seen = {}
    hook = block.attn.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    try:
        m.t2i_condition(tokens, masked.to(model.device), grid, m.embed_text(ids), attn)
    finally:
        hook.remove()
    x, heads = seen["x"], block.attn.num_heads
    q, k, _ = block.attn.qkv(x).reshape(B, x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1).cpu()
    nb, (h, w) = m.cfg.mar.buffer_size, grid
    r, c = torch.arange(N) // w, torch.arange(N) % w
    dist = torch.maximum((r[:, None] - r[None]).abs(), (c[:, None] - c[None]).abs())
    shares: dict[int, list[float]] = {}
    for i in range(B):
        vis, msk = (masked[i] == 0).nonzero().flatten(), (masked[i] == 1).nonzero().flatten()
        sub = weights[i][nb + msk][:, nb + vis]
        sub = sub / sub.sum(1, keepdim=True) * len(vis)  # 1 = an even share
        d = dist[msk][:, vis]
        for dd in d.unique().tolist():
            shares.setdefault(dd, []).append(float(sub[d == dd].mean()))
    return {dd: float(np.mean(v)) for dd, v in sorted(shares.items())}


def object_pixels(patch: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """(s, s) bool: the pixels of ``patch`` (3, s, s) that differ from ``background`` (3, 1, 1)
    by over 0.3 summed over channels (in [-1, 1] units): the rule the foreground loss weight
    of training uses."""
    return off_background(patch, background)


def patch_colour(patch: torch.Tensor, background: torch.Tensor, colour: torch.Tensor) -> str:
    """``"background"`` when under 4 of the :func:`object_pixels` of ``patch`` (3, s, s), else
    ``"other"`` when they are not mixtures of ``background`` (3, 1, 1) and ``colour`` (3,): their
    median distance from the segment between the two is over 0.3 in some channel ([-1, 1] units);
    else ``"same"``. An object's edge token, partly covered, mixes its colour with the background's
    (a mean colour far from either), so coverage is not mistaken for another colour."""
    obj = object_pixels(patch, background)
    if obj.sum() < 4:
        return "background"
    d = colour - background[:, 0, 0]  # (3,)
    p = patch[:, obj] - background[:, :, 0]  # (3, k)
    cover = ((d @ p) / (d @ d).clamp_min(1e-6)).clamp(0, 1)  # (k,) share of colour per pixel
    off = (p - d[:, None] * cover[None]).abs().max(0).values
    return "other" if off.median() > 0.3 else "same"


def true_neighbours(pixels: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int]) -> dict:
    """What the scenes themselves hold next to an object-core token: the :func:`patch_colour`
    classes of its 4 neighbours, judged against its colour (``pixels`` (n, 3, S, S), ``cells``
    (n, h*w) from :func:`object_cells`). The reference for the "one neighbour" context: the model
    sees a core token and not whether the token it draws is core, edge or background."""
    h, w = grid
    s = pixels.shape[-1] // w
    counts = {"same": 0, "other": 0, "background": 0}
    for b in range(pixels.shape[0]):
        background = median_colour(pixels[b])
        for j in cells[b].nonzero().flatten().tolist():
            y, x = divmod(j, w)
            core = pixels[b, :, s * y:s * y + s, s * x:s * x + s]
            colour = core[:, object_pixels(core, background)].mean(1)
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w:
                    patch = pixels[b, :, s * yy:s * yy + s, s * xx:s * xx + s]
                    counts[patch_colour(patch, background, colour)] += 1
    return counts


#: What the model sees in :func:`colour_copy`: one adjacent token of the object (what an object's
#: second token sees early in sampling), the 3 x 3 neighbourhood, every other token.
COPY_CONTEXTS = ("one neighbour", "neighbourhood", "all")


@torch.no_grad()
def colour_copy(model: Harmon, n_images: int = 60, draws: int = 16, seed: int = 0) -> list[dict]:
    """Share of drawn object tokens whose colour is not their object's, by context.

    In each scene one object-core token with an object-core neighbour is masked and drawn
    ``draws`` times by the head (unconditional prompt, so the colour can only come from the image;
    no guidance, temperature 1), the rest of the image as it was, and decoded; each drawn patch is
    classed by :func:`patch_colour` against the image's median colour (the background) and the
    true patch's object colour.
    """
    m, tokens, grid, _, _, pixels = encoded_scenes(model, n_images)
    B, N, _ = tokens.shape
    h, w = grid
    s = pixels.shape[-1] // w  # pixels per token side
    cells = object_cells(B, grid)
    ids = torch.tensor([model.tokenizer.unconditional_ids()], device=model.device)
    attn = torch.ones_like(ids)
    embeds = m.embed_text(ids)
    g = torch.Generator().manual_seed(seed)
    head_draws = TorchDraws(torch.Generator(model.device).manual_seed(seed + 1))
    counts = {c: {"other": 0, "background": 0, "drawn": 0} for c in COPY_CONTEXTS}
    for b in range(B):
        pairs = [(i, j) for i in cells[b].nonzero().flatten().tolist()
                 for j in (i - w, i + w, i - 1, i + 1)
                 if 0 <= j < N and (j // w == i // w or abs(j - i) == w) and cells[b, j] > 0]
        if not pairs:
            continue
        i, j = pairs[int(torch.randint(len(pairs), (1,), generator=g))]
        y, x = divmod(i, w)
        near = [yy * w + xx for yy in range(y - 1, y + 2) for xx in range(x - 1, x + 2)
                if 0 <= yy < h and 0 <= xx < w]
        background = median_colour(pixels[b])  # (3, 1, 1)
        truth = pixels[b, :, s * y:s * y + s, s * x:s * x + s]
        true_colour = truth[:, object_pixels(truth, background)].mean(1)
        for context in COPY_CONTEXTS:
            masked = torch.zeros(1, N) if context == "all" else torch.ones(1, N)
            if context == "one neighbour":
                masked[0, j] = 0
            elif context == "neighbourhood":
                masked[0, near] = 0
            masked[0, i] = 1
            z = m.t2i_condition(tokens[b:b + 1], masked.to(model.device), grid, embeds, attn)[0, i]
            drawn = tokens[b:b + 1].repeat(draws, 1, 1)
            drawn[:, i] = m.mar.diffloss.sample(z[None].repeat(draws, 1), 1.0, 1.0, head_draws)
            patch = m.decode_tokens(drawn, grid)[:, :, s * y:s * y + s, s * x:s * x + s].cpu()
            c = counts[context]
            for p in patch.float():
                c["drawn"] += 1
                verdict = patch_colour(p, background, true_colour)
                if verdict != "same":
                    c[verdict] += 1
    return [{"context": k, **v, "other_share": v["other"] / max(1, v["drawn"])}
            for k, v in counts.items()]


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
    print(f"{'visible':>8} {'with caption':>13} {'no caption':>11} {'object tokens':>14}")
    for r in rows:
        print(f"{r['visible']:>8.0%} {r['loss_caption']:>13.4f} {r['loss_none']:>11.4f} "
              f"{r['loss_caption_objects']:>14.4f}")
    noisy = noisy_context_table(model)
    print("the same loss (caption, 70% visible, 48 scenes) with errors in the visible tokens")
    print(f"{'visible tokens':>14} {'all scored':>11} {'object tokens':>14}")
    for r in noisy:
        print(f"{r['context']:>14} {r['all']:>11.4f} {r['objects']:>14.4f}")
    inpaint = inpainting_error(model)
    print("object tokens drawn by the head (one step, no guidance): squared error per channel")
    print(f"{'visible':>8} {'sampled':>8} {'another scene':>14}")
    for r in inpaint:
        print(f"{r['visible']:>8.0%} {r['mse']:>8.3f} {r['mse_shuffled']:>14.3f}")
    near = attention_by_distance(model)
    print("decoder block 0: attention to a visible token at grid distance d (1 = even share)")
    print("  ".join(f"d={d}: {v:.2f}" for d, v in near.items()))
    copying = colour_copy(model)
    print("an object token drawn given part of its object (no caption): how often another colour")
    print(f"{'context':>14} {'other colour':>13} {'background':>11} {'drawn':>6}")
    for r in copying:
        print(f"{r['context']:>14} {r['other_share']:>13.3f} {r['background']:>11} {r['drawn']:>6}")
    pixels, _ = scenes(400, model.cfg.image_size)
    grid = model.model.grid_for(*pixels.shape[-2:])
    truth = true_neighbours(pixels, object_cells(400, grid), grid)
    total = sum(truth.values())
    print("in 400 scenes, a token next to an object-core token: " +
          ", ".join(f"{k} {v / total:.3f}" for k, v in truth.items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": model.name, "provenance": model.provenance,
                                           "images": args.images, "rows": rows,
                                           "noisy_context": noisy,
                                           "inpainting": inpaint,
                                           "attention_by_distance": near,
                                           "colour_copy": copying,
                                           "true_neighbours_400_scenes": truth}, indent=1))


if __name__ == "__main__":
    main()

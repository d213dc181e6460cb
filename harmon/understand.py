"""Image to text: the whole image goes through the MAR encoder into the LLM, which answers.

Preprocessing pads to a square with gray 127, resizes (bicubic) and scales to [-1, 1]. The
prompt holds ``(S/16)^2 + 64`` placeholders (1088 at 512 px) whose embeddings are replaced by the
visual embeddings [image tokens in raster order, 64 buffers]. Decoding is greedy by default, with
a KV cache, and stops at ``<|im_end|>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import DynamicCache

from .models.harmon import HarmonModel
from .models.llm import positions_from_mask, run_body

#: How Harmon.score reads an image against a text (and generate(candidates=...) picks).
SCORE_METHODS = ("yes", "caption", "questions")

PAD_GRAY = 127


def load_image(image) -> Image.Image:
    """A PIL image, a path, or an (H, W, 3) uint8 array -> RGB PIL image (clear error otherwise)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be (H, W, 3) uint8, got {image.shape} "
                             f"{image.dtype}")
        return Image.fromarray(image)
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path} is not a readable image file ({e})") from None
    raise TypeError(f"expected a PIL image, a path or a uint8 array, got {type(image).__name__}")


def preprocess(image, size: int) -> torch.Tensor:
    """Pad to square with gray 127 (image centred), resize to size x size, scale to [-1, 1].

    Returns:
        (3, size, size) float32.
    """
    im = load_image(image)
    w, h = im.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (PAD_GRAY,) * 3)
    canvas.paste(im, ((side - w) // 2, (side - h) // 2))
    canvas = canvas.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return 2.0 * x - 1.0


@torch.no_grad()
def image_embeddings(model: HarmonModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> (B, (S/16)^2 + 64, H) LLM inputs."""
    grid = model.grid_for(pixel_values.shape[-2], pixel_values.shape[-1])
    tokens = model.encode_images(pixel_values.to(model.device, model.vae_dtype())).to(model.dtype)
    return model.visual_embeddings(tokens, grid)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
          generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids: argmax, or nucleus sampling."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)  # (B, 1)
    return idx.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def decode(model: HarmonModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
           eos_id: int, max_new_tokens: int = 1024, do_sample: bool = False,
           temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """Autoregressive decoding with a KV cache.

    Args:
        inputs_embeds: (B, L, H) prompt embeddings, **left** padded.
        attention_mask: (B, L) 0/1.
    Returns:
        B lists of new ids, each ending before ``eos_id`` (not included).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got "
                         f"temperature={temperature}, top_p={top_p}")
    B = inputs_embeds.shape[0]
    mask = attention_mask.long()
    cache = DynamicCache(config=model.llm.config)
    hidden = run_body(model.llm, inputs_embeds, mask, positions_from_mask(mask), cache)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=inputs_embeds.device)
    for _ in range(max_new_tokens):
        next_ids = _pick(model.logits(hidden[:, -1]).float(), do_sample, temperature, top_p,
                         generator)
        for b in range(B):
            if not done[b] and int(next_ids[b]) != eos_id:
                out[b].append(int(next_ids[b]))
        done |= next_ids == eos_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = positions_from_mask(mask)[:, -1:]
        hidden = run_body(model.llm, model.embed_text(next_ids[:, None]), mask, pos, cache)
    return out


@torch.no_grad()
def answer_log_likelihood(model: HarmonModel, inputs_embeds: torch.Tensor,
                          attention_mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-likelihood of the answer tokens of each row.

    Args:
        inputs_embeds: (B, L, H) prompt + answer embeddings, **right** padded.
        attention_mask: (B, L) 0/1.
        targets: (B, L) the ids to score at their own positions, -100 elsewhere (the prompt,
            padding); each is predicted from the hidden state one position before it.
    Returns:
        (B,) float32 sums of log-probabilities (nats).
    """
    mask = attention_mask.long()
    hidden = run_body(model.llm, inputs_embeds, mask, positions_from_mask(mask))
    tgt = targets[:, 1:]
    scored = tgt != -100
    # logits only where a target is read: the vocabulary of a real model is 151k wide
    logp = torch.log_softmax(model.logits(hidden[:, :-1][scored]).float(), dim=-1)
    picked = logp.gather(-1, tgt[scored][:, None]).squeeze(-1)
    rows = scored.nonzero()[:, 0]
    return torch.zeros(tgt.shape[0], device=picked.device).index_add_(0, rows, picked)

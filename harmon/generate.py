"""Text to image: masked autoregressive sampling, exactly as the reference.

The loop (harmon.md §8): draw a random order per row, prefill the prompt once, then for K steps
run MAR encoder -> LLM (on the cached prompt) -> MAR decoder, and let the diffusion head sample the
tokens that the cosine schedule reveals at that step. Classifier-free guidance doubles the batch:
rows [0, P) are conditional, rows [P, 2P) unconditional, and both halves share orders and tokens.

:func:`sample_tokens` works on token ids (it is what the parity checker replays);
:func:`generate_images` is the text-level entry point used by :class:`harmon.Harmon`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .fast.step import FastStep
from .models.harmon import HarmonModel
from .models.llm import PromptCache


def mask_len_schedule(num_tokens: int, num_iter: int) -> list[int]:
    """Number of tokens still masked after each step k = 0..K-1 (cosine schedule with clamps)."""
    masked, out = num_tokens, []
    for k in range(num_iter):
        m = _next_mask_len(num_tokens, num_iter, k, masked)
        out.append(m if k < num_iter - 1 else 0)
        masked = out[-1]
    return out


def _next_mask_len(N: int, K: int, k: int, masked_now: int) -> int:
    # floor(N cos(pi/2 (k+1)/K)) in float64, then at least 1 and at least one fewer than now
    m = int(np.floor(N * np.cos(math.pi / 2.0 * (k + 1) / K)))
    return max(1, min(masked_now - 1, m))


def cfg_scale_at(cfg: float, schedule: str, mask_len: int, num_tokens: int) -> float:
    """Guidance scale of a step: "constant" -> cfg; "linear" -> 1 + (cfg-1)(N - mask_len)/N."""
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        # float32, as the reference computes it
        return float(torch.tensor(1.0) + (cfg - 1.0) * (num_tokens - torch.tensor(float(mask_len)))
                     / num_tokens)
    raise ValueError(f"unknown cfg schedule {schedule!r}; expected 'constant' or 'linear'")


@dataclass
class StepInfo:
    """What a step did; passed to ``on_step`` callbacks (live previews, parity recording)."""

    step: int
    num_steps: int
    tokens: torch.Tensor  # (rows, N, 16) tokens after this step
    mask: torch.Tensor  # (rows, N) 1 = still masked after this step
    z_to_pred: torch.Tensor  # (n, D) conditions of the tokens sampled this step (all rows)
    sampled: torch.Tensor  # (n, 16) the head's output for them (all rows)
    cfg: float


@torch.no_grad()
def sample_tokens(model: HarmonModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  grid: tuple[int, int], draws, num_iter: int = 64, cfg: float = 3.0,
                  cfg_schedule: str = "constant", temperature: float = 1.0,
                  on_step: Callable[[StepInfo], None] | None = None,
                  head_sampler=None, fast_step: bool = False) -> torch.Tensor:
    """Sample latent tokens.

    Args:
        input_ids: (R, L) right-padded prompt ids; with ``cfg != 1`` R = 2P, rows [0, P)
            conditional and [P, 2P) unconditional, else R = P.
        attention_mask: (R, L) 0/1.
        grid: (h, w) token grid, N = h*w.
        draws: a draw source (:mod:`harmon.rng`): R permutations, then per step the head's noise.
        num_iter: K, number of MAR steps (1 <= K <= N).
        head_sampler: an object with ``sample(z, temperature, cfg, draws)`` replacing the
            reference head sampler (e.g. :class:`harmon.fast.FastHeadSampler`); it may return
            only the conditional rows.
        fast_step: compute each step's conditions with :class:`harmon.fast.FastStep` (the same
            z up to float rounding, less work) instead of the reference's ``mar_step``.
    Returns:
        (R, N, 16) final tokens (the unconditional rows equal the conditional ones).
    """
    if cfg < 1.0:
        raise ValueError(f"cfg must be >= 1 (1 disables guidance), got {cfg}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    R = input_ids.shape[0]
    guided = cfg != 1.0
    if guided and R % 2:
        raise ValueError(f"guided sampling needs an even number of rows (conditional then "
                         f"unconditional), got {R}")
    N = grid[0] * grid[1]
    if not 1 <= num_iter <= N:
        raise ValueError(f"num_iter must be in [1, {N}] for a {grid[0]}x{grid[1]} grid, "
                         f"got {num_iter}")
    device, dtype = model.device, model.dtype
    P = R // 2 if guided else R

    orders = torch.stack([draws.permutation(N, device=device) for _ in range(R)])  # (R, N)
    if guided:
        orders[P:] = orders[:P]
    if fast_step:
        step = FastStep(model, input_ids, attention_mask, grid, guided)
    else:
        prompt = PromptCache(model.llm, model.embed_text(input_ids.to(device)))
        text_mask = attention_mask.to(device)

        def step(tokens, mask, to_pred):
            return model.mar_step(tokens, mask, grid, prompt, text_mask).z[to_pred]

    mask = torch.ones(R, N, device=device, dtype=dtype)
    tokens = torch.zeros(R, N, model.cfg.mar.token_dim, device=device, dtype=dtype)
    for k in range(num_iter):
        mask_len = _next_mask_len(N, num_iter, k, int(mask[0].sum()))
        mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :mask_len], 1.0)
        if k == num_iter - 1:
            to_pred = mask.bool()
        else:
            to_pred = mask.bool() ^ mask_next.bool()
        z_to_pred = step(tokens, mask, to_pred)  # (R * p_k, D), row-major
        s = cfg_scale_at(cfg, cfg_schedule, mask_len, N) if guided else 1.0
        head = head_sampler or model.mar.diffloss
        sampled = head.sample(z_to_pred, temperature, s, draws)
        if guided:
            # only the conditional half is kept; both halves then carry the same tokens
            n_cond = int(to_pred[:P].sum())
            tokens[:P][to_pred[:P]] = sampled[:n_cond].to(dtype)
            tokens[P:] = tokens[:P]
        else:
            tokens[to_pred] = sampled.to(dtype)
        mask = mask_next if k < num_iter - 1 else torch.zeros_like(mask)
        if on_step is not None:
            on_step(StepInfo(k, num_iter, tokens, mask, z_to_pred, sampled, s))
    return tokens


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8: clamp(127.5 x + 128), truncated."""
    return (images.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

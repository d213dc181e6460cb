"""Text to image: masked autoregressive sampling, exactly as the reference.

The loop (harmon.md §8): draw a random order per row, prefill the prompt once, then for K steps
run MAR encoder -> LLM (on the cached prompt) -> MAR decoder, and let the diffusion head sample the
tokens that the cosine schedule reveals at that step. Classifier-free guidance doubles the batch:
rows [0, P) are conditional, rows [P, 2P) unconditional, and both halves share orders and tokens.

Optional and not in the reference: ``refine`` rounds after the K steps re-mask the tokens that fit
the rest of their image worst (:func:`token_errors`, the head's own training loss per token) and
sample them again; with ``refine=0`` (the default) nothing changes.

:func:`sample_tokens` works on token ids (it is what the parity checker replays);
:func:`generate_images` is the text-level entry point used by :class:`harmon.Harmon`.
"""

from __future__ import annotations

import math
import numbers
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


#: Defaults of the self-correction rounds (``refine``): the share of tokens each round draws
#: again and its steps. Chosen by benchmarks/guidance_sweep.py (docs/model_card.md).
REFINE_FRACTION = 0.15
REFINE_STEPS = 4


@torch.no_grad()
def sample_tokens(model: HarmonModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  grid: tuple[int, int], draws, num_iter: int = 64, cfg: float = 3.0,
                  cfg_schedule: str = "constant", temperature: float = 1.0,
                  on_step: Callable[[StepInfo], None] | None = None,
                  head_sampler=None, fast_step: bool = False, refine: int = 0,
                  refine_fraction: float = REFINE_FRACTION,
                  refine_steps: int = REFINE_STEPS) -> torch.Tensor:
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
        refine: rounds of self-correction after the K steps (0, the default, is the reference
            algorithm): each round re-masks the ``refine_fraction`` of every image's tokens that
            fit the rest worst (:func:`token_errors`) and samples them again in
            ``refine_steps`` steps, the worst last.
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
    if isinstance(refine, bool) or not isinstance(refine, numbers.Integral) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0 (rounds), got {refine!r}")
    if isinstance(refine_fraction, bool) or not isinstance(refine_fraction, numbers.Real) \
            or not 0 < refine_fraction <= 1:
        raise ValueError(f"refine_fraction must lie in (0, 1], got {refine_fraction!r}")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, numbers.Integral) \
            or refine_steps < 1:
        raise ValueError(f"refine_steps must be an integer >= 1, got {refine_steps!r}")
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

    head = head_sampler or model.mar.diffloss
    m = max(1, round(refine_fraction * N))
    total = num_iter + refine * min(refine_steps, m)
    done = 0

    def reveal(tokens, mask, mask_next, mask_len):
        """Sample the tokens masked in ``mask`` and not in ``mask_next`` (the same number per
        row; ``mask_len`` sets the step's guidance scale) and report the step."""
        nonlocal done
        to_pred = mask.bool() & ~mask_next.bool()
        z_to_pred = step(tokens, mask, to_pred)  # (R * p_k, D), row-major
        s = cfg_scale_at(cfg, cfg_schedule, mask_len, N) if guided else 1.0
        sampled = head.sample(z_to_pred, temperature, s, draws)
        if guided:
            # only the conditional half is kept; both halves then carry the same tokens
            n_cond = int(to_pred[:P].sum())
            tokens[:P][to_pred[:P]] = sampled[:n_cond].to(dtype)
            tokens[P:] = tokens[:P]
        else:
            tokens[to_pred] = sampled.to(dtype)
        if on_step is not None:
            on_step(StepInfo(done, total, tokens, mask_next, z_to_pred, sampled, s))
        done += 1

    mask = torch.ones(R, N, device=device, dtype=dtype)
    tokens = torch.zeros(R, N, model.cfg.mar.token_dim, device=device, dtype=dtype)
    for k in range(num_iter):
        mask_len = _next_mask_len(N, num_iter, k, int(mask[0].sum()))
        kept = mask_len if k < num_iter - 1 else 0  # the last step reveals every token left
        mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :kept], 1.0)
        reveal(tokens, mask, mask_next, mask_len)
        mask = mask_next
    for _ in range(refine):
        errors = token_errors(model, step, tokens, P, draws)
        # (P, N), worst first: the worst stay masked longest, so they are drawn with most context
        worst = errors.argsort(dim=1, descending=True)
        if guided:
            worst = torch.cat([worst, worst])
        mask = torch.zeros_like(mask).scatter_(1, worst[:, :m], 1.0)
        for mask_len in mask_len_schedule(m, min(refine_steps, m)):
            mask_next = torch.zeros_like(mask).scatter_(1, worst[:, :mask_len], 1.0)
            reveal(tokens, mask, mask_next, mask_len)
            mask = mask_next
    return tokens


#: Noise levels (of the 1000-step training process) at which :func:`token_errors` measures.
ERROR_TIMESTEPS = (100, 250, 400, 600, 800)


@torch.no_grad()
def token_errors(model: HarmonModel, step, tokens: torch.Tensor, P: int, draws,
                 groups: int = 4) -> torch.Tensor:
    """How badly each token fits the rest of its image and its prompt.

    Every token is masked once (in ``groups`` passes, each hiding a random 1/groups of the
    tokens and showing the rest), and the head's noise-prediction error of its value given the
    resulting condition is summed over :data:`ERROR_TIMESTEPS`: the training loss of that token,
    a per-token stand-in for -log p(token | the other tokens, the prompt).

    Args:
        step: ``step(tokens, mask, to_pred) -> z (n, D)`` of the sampling loop.
        tokens: (R, N, 16) with R = 2P (guided: rows [P, 2P) the unconditional copies) or P.
        P: the number of conditional rows, whose errors are returned.
    Returns:
        (P, N) errors (larger = fits worse).
    """
    R, N, _ = tokens.shape
    groups = min(groups, N)
    process, net = model.mar.diffloss.train_diffusion, model.mar.diffloss.net
    order = torch.stack([draws.permutation(N, device=tokens.device) for _ in range(P)])
    order = order.repeat(R // P, 1)  # guided rows share the partition
    errors = torch.zeros(P, N, device=tokens.device)
    bounds = [g * N // groups for g in range(groups + 1)]
    for a, b in zip(bounds, bounds[1:]):
        mask = torch.zeros(R, N, device=tokens.device, dtype=tokens.dtype)
        mask.scatter_(1, order[:, a:b], 1.0)
        to_pred = mask.bool()
        z = step(tokens, mask, to_pred)[: P * (b - a)]  # the conditional rows come first
        x0 = tokens[:P][to_pred[:P]]
        err = torch.zeros(x0.shape[0], device=x0.device)
        for t in ERROR_TIMESTEPS:
            noise = draws.randn(tuple(x0.shape), device=x0.device, dtype=x0.dtype)
            t_idx = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
            err += process.training_losses(net, x0, t_idx, z, noise)["mse"].float()
        errors[to_pred[:P]] = err
    return errors


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8: clamp(127.5 x + 128), truncated."""
    return (images.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

"""What trains, at which learning rate: module groups, freezing, AdamW groups and the schedule.

Module groups (parameter names of :class:`~harmon.models.harmon.HarmonModel`):

- ``mar_encoder``: ``mar.z_proj*``, ``mar.fake_latent``, ``mar.encoder_*``
- ``mar_decoder``: ``mar.decoder_*``, ``mar.mask_token``, ``mar.diffusion_pos_embed_learned``
- ``head``: ``mar.diffloss.*`` (the per-token diffusion MLP)
- ``connectors``: ``proj_in.*``, ``proj_out.*``
- ``llm``: ``llm.*`` (the tied output embedding is the input table)

Never trained: the VAE (frozen in every stage) and ``mar.class_emb`` (MAR's class table, kept only
so checkpoints load; Harmon never reads it, and a trainable unused parameter would stall DDP).

Weight decay follows the released code (training.md §4): none on 1-D tensors (norms, biases) and
none on the diffusion head; every other matrix, the position tables included, decays.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import GROUPS, OptimConfig


def group_of(name: str) -> str | None:
    """Module group of a parameter name, or None for parameters that never train."""
    if name.startswith("vae.") or name.startswith("mar.class_emb."):
        return None
    if name.startswith("mar.diffloss."):
        return "head"
    if name.startswith(("mar.z_proj", "mar.fake_latent", "mar.encoder_")):
        return "mar_encoder"
    if name.startswith(("mar.decoder_", "mar.mask_token", "mar.diffusion_pos_embed")):
        return "mar_decoder"
    if name.startswith(("proj_in.", "proj_out.")):
        return "connectors"
    if name.startswith("llm."):
        return "llm"
    raise ValueError(f"parameter {name!r} belongs to no module group; update harmon.train.optim")


def set_trainable(model: nn.Module, frozen: list[str]) -> dict[str, int]:
    """Set ``requires_grad`` per group; returns the number of trainable elements per group."""
    counts = {g: 0 for g in GROUPS}
    for name, p in model.named_parameters():
        g = group_of(name)
        train = g is not None and g not in frozen
        p.requires_grad_(train)
        if train:
            counts[g] += p.numel()
    return counts


def no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or name.endswith(".bias") or "diffloss" in name


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: one per (module group, decay or not), each with its peak ``lr``.

    ``model`` must be the bare :class:`HarmonModel` (or hold the same parameter objects, as DDP
    and ``fully_shard`` do), and :func:`set_trainable` must have run.
    """
    buckets: dict[tuple[str, bool], list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # the tied embedding appears once
            continue
        seen.add(id(p))
        key = (group_of(name), no_decay(name, p))
        buckets.setdefault(key, []).append(p)
    groups = []
    for g in GROUPS:
        for nd in (False, True):
            params = buckets.get((g, nd))
            if params:
                groups.append({"params": params, "lr": cfg.lr_of(g), "peak_lr": cfg.lr_of(g),
                               "weight_decay": 0.0 if nd else cfg.weight_decay,
                               "name": f"{g}{'_no_decay' if nd else ''}"})
    if not groups:
        raise ValueError("nothing to train: every module group is frozen (optim.frozen = "
                         f"{cfg.frozen})")
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool | None = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=fused)


def warmup_steps(cfg: OptimConfig, total: int) -> int:
    return max(1, round(0.01 * total)) if cfg.warmup_steps < 0 else cfg.warmup_steps


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimiser step ``step`` (0-based).

    Linear warm-up from ``warmup_start`` to 1 over the warm-up steps, then cosine / linear decay to
    ``min_lr_ratio`` at the last step, or constant.
    """
    w = warmup_steps(cfg, total)
    if step < w:
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * step / w
    if cfg.schedule == "constant" or total <= w:
        return 1.0
    progress = min(1.0, (step - w) / max(1, total - w))
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] * factor

"""The per-token diffusion network ``SimpleMLPAdaLN`` (harmon.md §7), under ``mar.diffloss.net``.

A residual MLP over one 16-channel token, modulated (adaLN) by the sum of a timestep embedding and the
MAR decoder's condition vector. It predicts 32 channels: the noise eps (0..15) and the learned-range
variance interpolation value v (16..31). The diffusion maths lives in :mod:`harmon.models.diffusion`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of integer timesteps t (n,) -> (n, dim), ordered [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / half)
    args = t[:, None].float() * freqs[None]  # (n, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t (n,) on the original 0..999 scale -> (n, w): sinusoidal features, Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """h + gate * MLP(LayerNorm(h) * (1 + scale) + shift), with (shift, scale, gate) from y."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h, y: (n, w) -> (n, w)."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return h + gate * self.mlp(modulate(self.in_ln(h), shift, scale))


class FinalLayer(nn.Module):
    """Parameter-free LayerNorm, adaLN shift/scale from y, Linear to the output channels."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h, y: (n, w) -> (n, out_channels)."""
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The diffusion head network.

    Args:
        in_channels: token size (16).
        model_channels: MLP width w.
        out_channels: 2 * in_channels (eps and the variance value v).
        z_channels: condition size D (the MAR decoder width).
        num_res_blocks: depth.
        grad_checkpointing: recompute the residual blocks in backward (training only).
    """

    def __init__(self, in_channels: int = 16, model_channels: int = 1024, out_channels: int = 32,
                 z_channels: int = 768, num_res_blocks: int = 6, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier Linear layers with zero bias; time MLP N(0, 0.02); adaLN outputs and the final
        Linear at zero, so a fresh head starts as an identity-modulated MLP that predicts 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (n, in_channels) noisy tokens, t: (n,) int timesteps 0..999, c: (n, D) -> (n, out_channels)."""
        h = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, y, use_reentrant=False)
            else:
                h = block(h, y)
        return self.final_layer(h, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance over a batch of 2M rows: c[:M] conditional, c[M:] unconditional.

        The network runs on cat(x[:M], x[:M]) — both halves share the conditional half's state — and
        the guided eps = eps_u + s (eps_c - eps_u) is written to both halves. The variance channels
        are not guided: every row keeps its own. Returns (2M, out_channels).
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        eps_c, eps_u = eps.chunk(2, dim=0)
        eps_g = eps_u + cfg_scale * (eps_c - eps_u)
        return torch.cat([torch.cat([eps_g, eps_g], dim=0), rest], dim=1)

"""Gaussian diffusion of the per-token head (diffusion.md): schedule, loss, respacing, sampling.

The improved-DDPM process as used by MAR and Harmon: 1000-step cosine schedule, eps prediction,
learned-range variance, hybrid MSE + VLB loss for training, and a respaced (100-step) ancestral
sampler with classifier-free guidance and temperature for generation.

Schedule tables are float64 numpy arrays; they are gathered at a timestep in float64 and applied as
float32. All randomness comes from a *draws* object (:mod:`harmon.rng`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from harmon.configs import MARConfig
from harmon.models.head import SimpleMLPAdaLN

# ----------------------------------------------------------------------------------------------
# Schedule and respacing


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999), abar(s) = cos^2((s+0.008)/1.008 pi/2)."""
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section: str) -> list[int]:
    """The kept timesteps (ascending) for a respacing string such as "100" (diffusion.md §4).

    "n" keeps n steps evenly spread over 0..T-1: start at 0, add the float stride (T-1)/(n-1)
    cumulatively, round each partial sum half-to-even. A comma list "a,b,..." splits 0..T-1 into
    that many equal sections (the first T % k one step longer) and spaces each the same way.
    """
    try:
        counts = [int(s) for s in str(section).split(",")]
    except ValueError:
        raise ValueError(f"timestep respacing {section!r}: expected an integer or a comma-separated "
                         "list of integers, e.g. '100'") from None
    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"timestep respacing {section!r}: cannot keep {count} steps of a "
                             f"section of {size}")
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))  # Python round: half to even
            cur += stride
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, kept: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the process that only visits ``kept``: beta'_j = 1 - abar[map[j]] / abar[map[j-1]].

    Returns (betas' (len(kept),) float64, timestep map (len(kept),) int64 to the original indices).
    """
    alphas_cumprod = np.cumprod(1.0 - betas)
    new_betas, last = [], 1.0
    for i in sorted(kept):
        new_betas.append(1.0 - alphas_cumprod[i] / last)
        last = alphas_cumprod[i]
    return np.array(new_betas, dtype=np.float64), np.array(sorted(kept), dtype=np.int64)


def create_diffusion(section: str | None = None, num_timesteps: int = 1000) -> "GaussianDiffusion":
    """The training process (``section`` None or "") or a respaced sampling process ("100")."""
    betas = cosine_betas(num_timesteps)
    if not section:
        return GaussianDiffusion(betas)
    return GaussianDiffusion(*respace_betas(betas, space_timesteps(num_timesteps, section)))


# ----------------------------------------------------------------------------------------------
# Elementwise densities


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log P(x) for a Gaussian discretised into bins of half-width 1/255 on [-1, 1], elementwise.

    Designed for 8-bit pixels; the reference applies it to the continuous latents at t = 0 all the
    same, so we keep it. The outermost bins are open towards +-infinity.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ----------------------------------------------------------------------------------------------
# The process


class GaussianDiffusion:
    """A discrete Gaussian diffusion given by its betas (float64).

    ``timestep_map[j]`` is the original (0..999) timestep of index j; the network always sees the
    original timestep, every schedule quantity comes from this process's own tables.
    """

    def __init__(self, betas: np.ndarray, timestep_map: np.ndarray | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.timestep_map = (np.arange(self.num_timesteps, dtype=np.int64) if timestep_map is None
                             else np.asarray(timestep_map, dtype=np.int64))
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.log_betas = np.log(betas)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the t=0 posterior variance is 0; its log is replaced by the t=1 value
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        self._device_tables = {}  # (name, device) -> float64 tensor, so steps do no host copies

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._device_tables:
            self._device_tables[key] = torch.from_numpy(getattr(self, name)).to(device)
        return self._device_tables[key]

    def _extract(self, name: str, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at t (int, or (n,) long) as float32, shaped to broadcast against x (n, C)."""
        v = self._table(name, x.device)[t].float()
        return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.  x0, noise: (n, C); t: (n,)."""
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior(self, x0, x, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = (self._extract("posterior_mean_coef1", t, x) * x0
                + self._extract("posterior_mean_coef2", t, x) * x)
        return mean, self._extract("posterior_log_variance_clipped", t, x)

    def p_mean_variance(self, net_out: torch.Tensor, x: torch.Tensor, t_index,
                        x0_clip: float | None = None) -> dict:
        """The reverse step p(x_{t-1} | x_t) given the network output.

        net_out: (n, 2C) = [eps, v]; x: (n, C) = x_t; t_index: int or (n,) long index into this
        process's tables (the respaced index for a respaced process); x0_clip: clamp x0 to
        [-x0_clip, x0_clip] before the posterior mean (None: the reference, unclipped).
        Returns dict of (n, C) tensors: eps, x0, mean, log_variance (learned range).
        """
        C = x.shape[1]
        eps, v = net_out[:, :C], net_out[:, C:]
        min_log = self._extract("posterior_log_variance_clipped", t_index, x)
        max_log = self._extract("log_betas", t_index, x)
        frac = (v + 1) / 2  # v = -1: posterior variance, v = +1: beta
        log_variance = frac * max_log + (1 - frac) * min_log
        x0 = (self._extract("sqrt_recip_alphas_cumprod", t_index, x) * x
              - self._extract("sqrt_recipm1_alphas_cumprod", t_index, x) * eps)
        if x0_clip is not None:
            x0 = x0.clamp(-x0_clip, x0_clip)
        mean, _ = self.q_posterior(x0, x, t_index)
        return dict(eps=eps, x0=x0, mean=mean, log_variance=log_variance)

    def training_losses(self, net, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                        noise: torch.Tensor) -> dict:
        """Per-token hybrid loss. x0, noise: (n, C); t: (n,) indices; z: (n, D).

        Returns dict of (n,) tensors: loss = mse + vb. The VLB term sees eps detached, so it trains
        only the variance channels; the MSE term trains eps.
        """
        x_t = self.q_sample(x0, t, noise)
        net_out = net(x_t, self._table("timestep_map", x0.device)[t], z)
        C = x0.shape[1]
        mse = ((noise - net_out[:, :C]) ** 2).mean(dim=1)

        frozen = torch.cat([net_out[:, :C].detach(), net_out[:, C:]], dim=1)
        p = self.p_mean_variance(frozen, x_t, t)
        true_mean, true_log_variance = self.q_posterior(x0, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"]).mean(dim=1)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).mean(dim=1)
        vb = torch.where(t == 0, nll, kl) / math.log(2.0)  # in bits
        return dict(loss=mse + vb, mse=mse, vb=vb)

    def guided_step(self, net: SimpleMLPAdaLN, x: torch.Tensor, k: int, z: torch.Tensor, cfg: float,
                    temperature: float, noise: torch.Tensor, x0_clip: float | None = None) -> dict:
        """One ancestral step at index k (diffusion.md §5-6). x, noise: (n, C); z: (n, D).

        With cfg != 1 the batch is [conditional; unconditional] halves and the network runs on the
        conditional half duplicated; both halves get the guided eps, each row keeps its own variance
        and its own x in the posterior mean. Returns dict of (n, C): eps, log_variance, mean, x_next.
        """
        if cfg != 1.0 and x.shape[0] % 2:
            raise ValueError(f"guided sampling (cfg={cfg}) needs an even batch of [conditional; "
                             f"unconditional] rows, got {x.shape[0]} rows")
        t = self._table("timestep_map", x.device)[k].expand(x.shape[0])
        net_out = net(x, t, z) if cfg == 1.0 else net.forward_with_cfg(x, t, z, cfg)
        p = self.p_mean_variance(net_out, x, k, x0_clip)
        if k == 0:
            x_next = p["mean"]  # the last step adds no noise (its draw is still consumed)
        else:
            x_next = p["mean"] + torch.exp(0.5 * p["log_variance"]) * noise * temperature
        return dict(eps=p["eps"], log_variance=p["log_variance"], mean=p["mean"], x_next=x_next)

    @torch.no_grad()
    def p_sample_loop(self, net: SimpleMLPAdaLN, z: torch.Tensor, cfg: float, temperature: float,
                      draws, x0_clip: float | None = None) -> torch.Tensor:
        """Ancestral sampling over all indices, last to first. z: (n, D) -> tokens (n, C).

        With cfg != 1, z is [conditional; unconditional] (n = 2M): the initial noise is drawn for M
        rows and stacked twice, and only rows 0..M-1 matter to the caller. With cfg == 1 the M = n
        rows are sampled on their own. One ``randn_like`` per step, also at index 0.
        """
        C = net.in_channels
        if cfg != 1.0 and z.shape[0] % 2:
            raise ValueError(f"guided sampling (cfg={cfg}) needs an even batch of [conditional; "
                             f"unconditional] conditions, got {z.shape[0]} rows")
        if cfg == 1.0:
            x = draws.randn((z.shape[0], C), device=z.device, dtype=z.dtype)
        else:
            x = draws.randn((z.shape[0] // 2, C), device=z.device, dtype=z.dtype)
            x = torch.cat([x, x], dim=0)  # the initial noise is not scaled by the temperature
        for k in reversed(range(self.num_timesteps)):
            noise = draws.randn_like(x)
            x = self.guided_step(net, x, k, z, cfg, temperature, noise, x0_clip)["x_next"]
        return x


# ----------------------------------------------------------------------------------------------
# The head as used by MAR


class DiffLoss(nn.Module):
    """Diffusion loss and sampler of MAR tokens; the network sits at ``net`` (``mar.diffloss.net.*``)."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.in_channels = cfg.token_dim
        self.net = SimpleMLPAdaLN(
            in_channels=cfg.token_dim, model_channels=cfg.diffloss_w, out_channels=2 * cfg.token_dim,
            z_channels=cfg.decoder_embed_dim, num_res_blocks=cfg.diffloss_d,
            grad_checkpointing=cfg.grad_checkpointing)
        self.train_diffusion = create_diffusion(None)
        self.gen_diffusion = create_diffusion(cfg.num_sampling_steps)
        self.x0_clip = cfg.x0_clip  # sampling only (see MARConfig.x0_clip)

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
                draws=None, per_row: bool = False) -> torch.Tensor:
        """Scalar loss. target: (n, C) clean tokens; z: (n, D); mask: (n,) weights (1 = counts) or None.
        With ``per_row`` the (n,) unweighted losses instead (mask ignored), for measures that
        weigh the same draws several ways.

        Draws t = randint(1000, (n,)) then noise = randn_like(target), in that order.
        """
        if draws is None:
            raise ValueError("DiffLoss.forward needs a draws source (harmon.rng.TorchDraws / ReplayDraws)")
        t = draws.randint(self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        noise = draws.randn_like(target)
        loss = self.train_diffusion.training_losses(self.net, target, t, z, noise)["loss"]
        if per_row:
            return loss
        if mask is None:
            return loss.mean()
        return (loss * mask).sum() / mask.sum()

    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0, draws=None) -> torch.Tensor:
        """Tokens (n, C) for conditions z (n, D); with cfg != 1 only rows 0..n/2-1 are meaningful."""
        if draws is None:
            raise ValueError("DiffLoss.sample needs a draws source (harmon.rng.TorchDraws / ReplayDraws)")
        return self.gen_diffusion.p_sample_loop(self.net, z, cfg, temperature, draws, self.x0_clip)

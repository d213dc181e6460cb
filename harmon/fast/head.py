"""A faster, output-preserving sampler for the per-token diffusion head.

The reference sampler (``DiffLoss.sample``) spends each of its 100 reverse steps on many tiny
operations. This one gives the same tokens (up to float rounding) with far fewer of them:

- everything that depends only on (timestep, condition) is computed for all 100 steps at once,
  in a few large matrix products instead of 100 x depth small ones: the timestep embeddings, the
  condition embedding, and the adaLN shift / scale / gate of every block (when they fit in
  ``modulation_budget`` bytes; otherwise per step);
- the schedule coefficients are gathered once per call as Python floats, and the variance and
  noise are folded into two fused element-wise operations;
- with guidance, only the conditional half of the state is carried: the reference feeds the
  network the conditional half twice and never reads the unconditional half's trajectory;
- the network runs through ``torch.nn.functional`` directly, without module-call overhead;
- optionally, one step is compiled with ``torch.compile`` (it pays on GPUs, not on small CPUs).

Two approximate options, off by default: fewer reverse steps (``num_steps``: a coarser respacing
of the same 1000-step process), and a DDIM update (``sampler="ddim"``, Song et al. 2021) in place
of the ancestral one. DDIM keeps only the network's noise prediction (the learned variance is not
used) and moves along the predicted trajectory; ``eta`` = 0 is deterministic given the initial
noise, ``eta`` = 1 injects as much noise as an ancestral step (scaled by the temperature). It is
meant for few steps, where it loses less than the ancestral update.

Random draws are consumed exactly as by the reference (initial noise for the conditional rows,
then one draw of the full batch's shape per step, also at the last step), so the same seed gives
the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.diffusion import DiffLoss, create_diffusion

_EPS = 1e-6  # LayerNorm eps of the head


class FastHeadSampler:
    """Sampling with a :class:`~harmon.models.diffusion.DiffLoss`'s network and schedule.

    Args:
        head: the model's ``mar.diffloss``.
        compile: compile the reverse step with ``torch.compile``.
        num_steps: reverse steps of the head; None keeps the model's (100, exact). Fewer steps
            (a coarser respacing of the same 1000-step process) are an approximation.
        sampler: "ddpm" (the reference's ancestral update) or "ddim" (an approximation).
        eta: DDIM's noise level (0 = deterministic; ignored by "ddpm").
        modulation_budget: bytes allowed for the precomputed adaLN modulations of one call.
    """

    def __init__(self, head: DiffLoss, compile: bool = False, num_steps: int | None = None,
                 sampler: str = "ddpm", eta: float = 0.0,
                 modulation_budget: int = 256 * 2 ** 20):
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"head sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
        self.head = head
        self.net = head.net
        self.diffusion = (head.gen_diffusion if num_steps is None else
                          create_diffusion(str(num_steps), head.train_diffusion.num_timesteps))
        self.sampler, self.eta = sampler, float(eta)
        self.x0_clip = head.x0_clip
        self.budget = modulation_budget
        self._tables: dict = {}
        step = _reverse_step if sampler == "ddpm" else _ddim_step
        self._step = torch.compile(step, dynamic=True) if compile else step

    def tables(self, device: torch.device, dtype: torch.dtype) -> dict:
        """Per-step time embeddings (T, w) and folded coefficients, cached per weights version."""
        version = tuple(p._version for p in self.net.time_embed.parameters())
        key = (device, dtype, version)
        if key not in self._tables:
            self._tables.clear()
            d = self.diffusion
            t = torch.as_tensor(d.timestep_map, device=device)
            # float64 tables applied as float32, as the reference does
            f = lambda name: torch.from_numpy(getattr(d, name)).float().double()
            sr, srm1 = f("sqrt_recip_alphas_cumprod"), f("sqrt_recipm1_alphas_cumprod")
            c1, c2 = f("posterior_mean_coef1"), f("posterior_mean_coef2")
            lo, hi = f("posterior_log_variance_clipped"), f("log_betas")
            # the mean keeps the reference's order of operations (x0 first): at the noisiest
            # steps x0 amplifies x and eps by ~1e4, so a folded a x - b eps rounds differently
            # enough to change random-weight trajectories. 0.5 log var = p + q v.
            if self.sampler == "ddpm":
                coefs = torch.stack([sr, srm1, c1, c2, 0.5 * lo + 0.25 * (hi - lo),
                                     0.25 * (hi - lo)], dim=1)
            else:  # x_prev = a x0 + b eps + sigma z, with x0 = sr x - srm1 eps
                ab, ab_prev = f("alphas_cumprod"), f("alphas_cumprod_prev")
                sigma = self.eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
                b = (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt()
                coefs = torch.stack([sr, srm1, ab_prev.sqrt(), b, sigma, sigma], dim=1)
            self._tables[key] = {"t_emb": self.net.time_embed(t).to(dtype),
                                 "coefs": [tuple(float(v) for v in row) for row in coefs]}
        return self._tables[key]

    def _modulations(self, c: torch.Tensor, t_emb: torch.Tensor):
        """A function k -> adaLN parameters of step k: per block (shift, 1 + scale, gate), then
        the final layer's (shift, 1 + scale); each (R, w)."""
        net = self.net
        blocks = [b.adaLN_modulation[1] for b in net.res_blocks] + [
            net.final_layer.adaLN_modulation[1]]
        T, (R, w) = t_emb.shape[0], c.shape
        nbytes = T * R * w * (3 * len(net.res_blocks) + 2) * c.element_size()

        def split(m: torch.Tensor, n: int):
            parts = m.chunk(n, dim=-1)
            return (parts[0], 1 + parts[1], *parts[2:])

        if nbytes <= self.budget:
            y = F.silu(t_emb[:, None, :] + c[None])  # (T, R, w)
            per_block = [split(F.linear(y, lin.weight, lin.bias), 3 if i < len(blocks) - 1 else 2)
                         for i, lin in enumerate(blocks)]
            return lambda k: [tuple(p[k] for p in parts) for parts in per_block]

        def at(k: int):
            y = F.silu(t_emb[k] + c)
            return [split(F.linear(y, lin.weight, lin.bias), 3 if i < len(blocks) - 1 else 2)
                    for i, lin in enumerate(blocks)]
        return at

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float, cfg: float, draws) -> torch.Tensor:
        """Tokens for conditions z.

        Args:
            z: (2M, D) [conditional; unconditional] when ``cfg != 1``, else (M, D).
        Returns:
            (M, C): the tokens of the conditional rows (all rows without guidance).
        """
        guided = cfg != 1.0
        R = z.shape[0]
        if guided and R % 2:
            raise ValueError(f"guided sampling needs an even batch of conditions, got {R} rows")
        M = R // 2 if guided else R
        net = self.net
        C = net.in_channels
        tab = self.tables(z.device, z.dtype)
        x = draws.randn((M, C), device=z.device, dtype=z.dtype)  # not scaled by temperature
        c = F.linear(z, net.cond_embed.weight, net.cond_embed.bias)  # (R, w)
        mods = self._modulations(c, tab["t_emb"])
        layers = [(b.in_ln, b.mlp[0], b.mlp[2]) for b in net.res_blocks]
        for k in reversed(range(self.diffusion.num_timesteps)):
            # the reference draws noise for its whole (R, C) state; only the first M rows matter
            noise = draws.randn((R, C), device=z.device, dtype=z.dtype)[:M]
            x = self._step(net.input_proj, layers, net.final_layer.linear, mods(k), x,
                           tab["coefs"][k], noise, float(cfg), float(temperature), k > 0,
                           self.x0_clip)
        return x


def _network(input_proj, layers, final_linear, mods, x: torch.Tensor, cfg: float):
    """The head's network on the conditional state x (M, C): the guided noise prediction (M, C)
    and the raw output (R, 2C) (its second half holds the variance values)."""
    M, C = x.shape
    guided = mods[0][0].shape[0] != M
    h = F.linear(torch.cat([x, x]) if guided else x, input_proj.weight, input_proj.bias)
    for (ln, fc1, fc2), (shift, scale1p, gate) in zip(layers, mods[:-1]):
        u = torch.addcmul(shift, F.layer_norm(h, h.shape[-1:], ln.weight, ln.bias, eps=_EPS),
                          scale1p)
        u = F.linear(F.silu(F.linear(u, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        h = torch.addcmul(h, gate, u)
    shift, scale1p = mods[-1]
    h = torch.addcmul(shift, F.layer_norm(h, h.shape[-1:], eps=_EPS), scale1p)  # no affine
    out = F.linear(h, final_linear.weight, final_linear.bias)  # (R, 2C)
    eps = out[:, :C]
    if guided:
        eps = torch.add(eps[M:], eps[:M] - eps[M:], alpha=cfg)
    return eps, out


def _reverse_step(input_proj, layers, final_linear, mods, x: torch.Tensor, coefs, noise,
                  cfg: float, temperature: float, add_noise: bool,
                  x0_clip: float | None = None) -> torch.Tensor:
    """One ancestral step on the conditional state x (M, C)."""
    sr, srm1, c1, c2, p, q = coefs
    M, C = x.shape
    eps, out = _network(input_proj, layers, final_linear, mods, x, cfg)
    x0 = sr * x - srm1 * eps
    if x0_clip is not None:
        x0 = x0.clamp(-x0_clip, x0_clip)
    mean = c1 * x0 + c2 * x
    if not add_noise:
        return mean
    std = torch.exp(out[:M, C:] * q + p)  # exp(0.5 log variance), the conditional rows' own
    return torch.addcmul(mean, std, noise, value=temperature)


def _ddim_step(input_proj, layers, final_linear, mods, x: torch.Tensor, coefs, noise,
               cfg: float, temperature: float, add_noise: bool,
               x0_clip: float | None = None) -> torch.Tensor:
    """One DDIM step on the conditional state x (M, C)."""
    eps, _ = _network(input_proj, layers, final_linear, mods, x, cfg)
    return ddim_update(x, eps, coefs, noise, temperature, add_noise, x0_clip)


def ddim_update(x: torch.Tensor, eps: torch.Tensor, coefs, noise: torch.Tensor,
                temperature: float, add_noise: bool, x0_clip: float | None = None) -> torch.Tensor:
    """x_{t-1} from x_t and the predicted noise (both (M, C)), with the step's DDIM coefficients
    ``(sqrt(1/ab), sqrt(1/ab - 1), sqrt(ab_prev), sqrt(1 - ab_prev - sigma^2), sigma, sigma)``.
    With ``x0_clip`` the clamped x0 and the noise it implies are used."""
    sr, srm1, a, b, sigma, _ = coefs
    x0 = sr * x - srm1 * eps
    if x0_clip is not None:
        x0 = x0.clamp(-x0_clip, x0_clip)
        eps = (sr * x - x0) / srm1
    x = a * x0 + b * eps
    if add_noise and sigma > 0:
        x = torch.add(x, noise, alpha=sigma * temperature)
    return x

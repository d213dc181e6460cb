"""A faster, output-preserving sampler for the per-token diffusion head.

The reference sampler (``DiffLoss.sample``) spends each of its 100 reverse steps on many tiny
operations. This one gives the same tokens (up to float rounding) with far fewer of them:

- everything that depends only on (timestep, condition) is computed for all 100 steps at once,
  in a few large matrix products instead of 100 x depth small ones: the timestep embeddings, the
  condition embedding, and the adaLN shift / scale / gate of every block (when they fit in
  ``modulation_budget`` bytes; otherwise per step);
- with guidance, only the conditional half of the state is carried: the reference feeds the
  network the conditional half twice and never reads the unconditional half's trajectory. The
  input projection and first LayerNorm therefore run on half the rows, and since guidance is
  linear in the output layer it is applied to the last hidden state (one small product instead
  of a full output and four element-wise operations);
- the schedule coefficients are Python floats gathered once per call; the log-variance map of
  each step is folded into the output layer's variance rows, so a step's noise scale is one
  product and one ``exp``;
- the network runs through ``torch.nn.functional`` and ``addmm`` on pre-transposed weights,
  without module-call overhead;
- optionally (``compile=True``) the reverse process runs in compiled chunks of up to five
  steps (``torch.compile`` with the C++ wrapper, dynamic in the number of tokens): the same
  tokens with a fraction of the per-operation overhead, after a one-time compilation.

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
        compile: run the reverse process in compiled chunks of steps (``torch.compile``).
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
        # the adaLN linears: one per residual block (shift, scale, gate), then the final layer's
        self.adaln = [b.adaLN_modulation[1] for b in head.net.res_blocks] + [
            head.net.final_layer.adaLN_modulation[1]]
        self.diffusion = (head.gen_diffusion if num_steps is None else
                          create_diffusion(str(num_steps), head.train_diffusion.num_timesteps))
        self.sampler, self.eta = sampler, float(eta)
        self.x0_clip = head.x0_clip
        self.budget = modulation_budget
        self._tables: dict = {}
        self._step = _reverse_step if sampler == "ddpm" else _ddim_step
        self.compile = compile
        self._compiled: dict = {}  # chunk length -> compiled function

    def tables(self, device: torch.device, dtype: torch.dtype) -> dict:
        """Per-step time embeddings (T, w), schedule coefficients, and the output layer's weights
        (noise rows; variance rows with the step's log-variance map folded in), cached per
        weights version."""
        version = tuple(p._version for p in self.net.parameters())
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
                p, q = 0.5 * lo + 0.25 * (hi - lo), 0.25 * (hi - lo)
                coefs = torch.stack([sr, srm1, c1, c2, p, q], dim=1)
            else:  # x_prev = a x0 + b eps + sigma z, with x0 = sr x - srm1 eps
                ab, ab_prev = f("alphas_cumprod"), f("alphas_cumprod_prev")
                sigma = self.eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
                b = (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt()
                coefs = torch.stack([sr, srm1, ab_prev.sqrt(), b, sigma, sigma], dim=1)
            net = self.net
            C, lin = net.in_channels, net.final_layer.linear
            w_var, b_var = lin.weight[C:].double(), lin.bias[C:].double()
            var_w = var_b = None
            if self.sampler == "ddpm":
                # std = exp(p + q v) with v = h W_v + b_v: fold the affine map into the weights
                var_w = (q[:, None, None] * w_var.t()[None]).to(dtype)  # (T, w, C), transposed
                var_b = (q[:, None] * b_var[None] + p[:, None]).to(dtype)  # (T, C)
            t_lin = lambda w, b: (w.detach().t().contiguous(), b.detach())  # for addmm
            self._tables[key] = {
                "t_emb": net.time_embed(t).to(dtype),
                "coefs": [tuple(float(v) for v in row) for row in coefs],
                "coef_tensor": coefs.float().to(device),
                "weights": (t_lin(net.input_proj.weight, net.input_proj.bias),
                            [(b.in_ln.weight, b.in_ln.bias, t_lin(b.mlp[0].weight, b.mlp[0].bias),
                              t_lin(b.mlp[2].weight, b.mlp[2].bias)) for b in net.res_blocks],
                            t_lin(lin.weight[:C], lin.bias[:C])),
                "var": (var_w, var_b)}
        return self._tables[key]

    def _modulations(self, c: torch.Tensor, t_emb: torch.Tensor, groups: int):
        """A function k -> adaLN parameters of step k: per block (shift, 1 + scale, gate), then
        the final layer's (shift, 1 + scale); each (G, M, w) for R = G * M rows of c (G = 2
        with guidance: conditional rows, then unconditional)."""
        blocks = self.adaln
        T = t_emb.shape[0]
        nbytes = T * self._modulation_bytes(c)

        def per_block(y: torch.Tensor):
            return [_adaln_parts(F.linear(y, lin.weight, lin.bias).unflatten(-2, (groups, -1)),
                                 3 if i < len(blocks) - 1 else 2) for i, lin in enumerate(blocks)]

        if nbytes <= self.budget:
            # every step's views in one pass, so that a step only indexes a Python list
            parts = per_block(F.silu(t_emb[:, None, :] + c[None]))  # each (T, G, M, w)
            steps = [[list(p.unbind(0)) for p in block] for block in parts]
            table = [[tuple(p[k] for p in block) for block in steps] for k in range(T)]
            return table.__getitem__
        return lambda k: per_block(F.silu(t_emb[k] + c))

    def _modulation_bytes(self, c: torch.Tensor) -> int:
        """Bytes of one step's adaLN modulations for conditions c (R, w)."""
        R, w = c.shape
        return R * w * (3 * len(self.adaln) - 1) * c.element_size()

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
        if self.compile:
            return self._sample_chunked(x, c, tab, draws, R, cfg, temperature)
        mods = self._modulations(c, tab["t_emb"], 2 if guided else 1)
        var_w, var_b = tab["var"]
        for k in reversed(range(self.diffusion.num_timesteps)):
            # the reference draws noise for its whole (R, C) state; only M rows matter
            noise = draws.randn((R, C), device=z.device, dtype=z.dtype)[:M]
            weights = (*tab["weights"], None if var_w is None else (var_w[k], var_b[k]))
            x = self._step(weights, mods(k), x, tab["coefs"][k], noise, float(cfg),
                           float(temperature), k > 0, self.x0_clip)
        return x

    def _sample_chunked(self, x: torch.Tensor, c: torch.Tensor, tab: dict, draws, R: int,
                        cfg: float, temperature: float) -> torch.Tensor:
        """The reverse process in compiled chunks of steps (one graph of S unrolled steps,
        shapes dynamic in the number of tokens), for x (M, C) and conditions c (R, w).

        The noise of all steps is drawn first, in the reference's order (nothing else draws in
        between); the last step's draw is zeroed, which makes its update the plain mean. A single
        row is padded to two so that one compiled graph serves every number of tokens.
        """
        M, C = x.shape
        G = R // M
        T = self.diffusion.num_timesteps
        noise = torch.stack([draws.randn((R, C), device=x.device, dtype=x.dtype)[:M]
                             for _ in range(T)])  # (T, M, C), in step order T-1 .. 0
        noise[-1] = 0
        noise = noise * temperature  # the temperature and the guidance scale enter as tensors:
        cfg_t = x.new_tensor(cfg)  # a graph specialised on a Python float would recompile
        pad = M == 1
        if pad:
            x, noise = x.repeat(2, 1), noise.repeat(1, 2, 1)
            c = c.view(G, 1, -1).repeat(1, 2, 1).flatten(0, 1)
        if "in_step_order" not in tab:  # the tables indexed T-1 .. 0, once per weights
            order = torch.arange(T - 1, -1, -1, device=x.device)
            var_w, var_b = tab["var"]
            tab["in_step_order"] = (tab["t_emb"][order], tab["coef_tensor"][order],
                                    None if var_w is None else (var_w[order], var_b[order]))
        t_emb, coefs, var = tab["in_step_order"]
        S = _chunk_length(T)
        if S not in self._compiled:
            self._compiled[S] = torch.compile(_make_chunk(S, self._step, self.x0_clip),
                                              dynamic=True, options={"cpp_wrapper": True})
        run = self._compiled[S]
        # the modulations of as many steps as the budget allows (a multiple of S) at once
        span = max(S, min(T, self.budget // self._modulation_bytes(c) // S * S))
        for i in range(0, T, S):
            if i % span == 0:
                y = F.silu(t_emb[i:i + span, None, :] + c[None])  # (span, rows, w)
                mods = [F.linear(y, lin.weight, lin.bias).unflatten(1, (G, -1))
                        for lin in self.adaln]
            j = i % span
            x = run(tab["weights"], [m[j:j + S] for m in mods], x, coefs[i:i + S],
                    noise[i:i + S], None if var is None else (var[0][i:i + S], var[1][i:i + S]),
                    cfg_t)
        return x[:1] if pad else x


def _adaln_parts(m: torch.Tensor, n: int):
    """An adaLN linear's output (..., n w) -> (shift, 1 + scale[, gate]), each (..., w)."""
    parts = m.chunk(n, dim=-1)
    return (parts[0], 1 + parts[1], *parts[2:])


def _chunk_length(T: int, longest: int = 5) -> int:
    """Steps per compiled chunk: the largest divisor of T that is at most ``longest``."""
    return max(d for d in range(1, min(T, longest) + 1) if T % d == 0)


def _make_chunk(S: int, step, x0_clip: float | None):
    """A function running S reverse steps with per-step tensors (modulations (S, G, M, k w),
    coefficients (S, 6), noise (S, M, C) already scaled by the temperature, folded variance
    weights) and a 0-dim guidance scale, to be compiled."""

    def chunk(base, mods, x, coefs, noise, var, cfg):
        for j in range(S):
            mk = [_adaln_parts(m[j], 3 if i < len(mods) - 1 else 2) for i, m in enumerate(mods)]
            weights = (*base, None if var is None else (var[0][j], var[1][j]))
            x = step(weights, mk, x, tuple(coefs[j].unbind()), noise[j], cfg, 1.0, True, x0_clip)
        return x

    return chunk


def _network(weights, mods, x: torch.Tensor, cfg: float):
    """The head's network on the conditional state x (M, C).

    ``weights`` holds every linear layer as (W^T contiguous, bias), for ``addmm`` on 2-D rows.
    Both halves of a guided batch start from the same state, so the input projection and the
    first LayerNorm run on M rows and broadcast against the (G, M, w) modulations. Guidance is
    linear in the output layer, so it is applied to the last hidden state: one (M, w) x (w, C)
    product gives the guided noise prediction. Returns it (M, C) and the conditional rows' last
    hidden state (M, w), from which the variance is read.
    """
    (w_in, b_in), layers, (w_eps, b_eps), _ = weights
    h = torch.addmm(b_in, x, w_in)  # (M, w), broadcast over G
    for (ln_w, ln_b, (w1, b1), (w2, b2)), (shift, scale1p, gate) in zip(layers, mods[:-1]):
        u = torch.addcmul(shift, F.layer_norm(h, h.shape[-1:], ln_w, ln_b, eps=_EPS), scale1p)
        u2 = u.view(-1, u.shape[-1])  # (R, w)
        u2 = torch.addmm(b2, F.silu(torch.addmm(b1, u2, w1)), w2)
        h = torch.addcmul(h, gate, u2.view(u.shape))  # (G, M, w)
    shift, scale1p = mods[-1]
    h = torch.addcmul(shift, F.layer_norm(h, h.shape[-1:], eps=_EPS), scale1p)  # no affine
    h_cond = h[0]
    h_mix = torch.lerp(h[1], h_cond, cfg) if h.shape[0] == 2 else h_cond  # u + s (c - u)
    return torch.addmm(b_eps, h_mix, w_eps), h_cond


def _reverse_step(weights, mods, x: torch.Tensor, coefs, noise, cfg: float, temperature: float,
                  add_noise: bool, x0_clip: float | None = None) -> torch.Tensor:
    """One ancestral step on the conditional state x (M, C)."""
    sr, srm1, c1, c2, _, _ = coefs
    eps, h_cond = _network(weights, mods, x, cfg)
    x0 = sr * x - srm1 * eps
    if x0_clip is not None:
        x0 = x0.clamp(-x0_clip, x0_clip)
    mean = c1 * x0 + c2 * x
    if not add_noise:
        return mean
    var_w, var_b = weights[3]
    std = torch.exp(torch.addmm(var_b, h_cond, var_w))  # exp(0.5 log var), conditional rows
    return torch.addcmul(mean, std, noise, value=temperature)


def _ddim_step(weights, mods, x: torch.Tensor, coefs, noise, cfg: float, temperature: float,
               add_noise: bool, x0_clip: float | None = None) -> torch.Tensor:
    """One DDIM step on the conditional state x (M, C)."""
    eps, _ = _network(weights, mods, x, cfg)
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
    if add_noise and torch.is_tensor(sigma):  # compiled chunks (the last step's noise is 0)
        x = x + noise * (sigma * temperature)
    elif add_noise and sigma > 0:
        x = torch.add(x, noise, alpha=sigma * temperature)
    return x

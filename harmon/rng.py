"""Sources of random draws.

Every random number Harmon consumes (generation orders, head noise, training timesteps and mask
ratios) goes through a *draw source*, so that one algorithm serves two purposes:

- :class:`TorchDraws` draws from a ``torch.Generator``: seeded and reproducible on one device.
- :class:`ReplayDraws` replays draws recorded from the reference implementation, in order, and
  checks that each one is of the expected kind and shape. This is how the parity fixtures are
  reproduced draw for draw.

The kinds are those named by the fixtures: ``randn``, ``randn_like``, ``randint``, ``shuffle``
(a permutation) and ``truncnorm``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


class TorchDraws:
    """Draws from ``generator`` (or torch's global RNG when None) on ``device``."""

    def __init__(self, generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        self.generator = generator
        self.device = torch.device(device) if generator is None else generator.device

    def _to(self, x: torch.Tensor, device) -> torch.Tensor:
        return x.to(device) if device is not None else x

    def randn(self, shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
        x = torch.randn(tuple(shape), generator=self.generator, device=self.device, dtype=dtype)
        return self._to(x, device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, device=x.device, dtype=x.dtype)

    def randint(self, high: int, shape: Sequence[int], device=None) -> torch.Tensor:
        x = torch.randint(0, high, tuple(shape), generator=self.generator, device=self.device)
        return self._to(x, device)

    def permutation(self, n: int, device=None) -> torch.Tensor:
        x = torch.randperm(n, generator=self.generator, device=self.device)
        return self._to(x, device)

    def truncnorm(self, low: float, high: float, mean: float, std: float) -> float:
        """One draw of N(mean, std) truncated to [low, high] (inverse-CDF method, float64)."""
        u = torch.rand((), generator=self.generator, device=self.device, dtype=torch.float64).item()
        cdf = lambda v: 0.5 * (1.0 + math.erf((v - mean) / (std * math.sqrt(2.0))))
        a, b = cdf(low), cdf(high)
        p = min(max(a + u * (b - a), 1e-15), 1 - 1e-15)
        # erfinv through torch keeps us free of scipy
        v = mean + std * math.sqrt(2.0) * torch.special.erfinv(torch.tensor(2 * p - 1,
                                                                       dtype=torch.float64)).item()
        return min(max(v, low), high)


class ReplayError(RuntimeError):
    """A replayed draw did not match what the algorithm asked for."""


class ReplayDraws:
    """Replays recorded draws.

    Args:
        tensors: mapping from draw key (e.g. ``"draw_0003"``) to its recorded value.
        draws: ordered list of ``{"key", "kind", "shape"}`` records (a fixture's ``draws``).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], draws: list[dict]):
        self.tensors = tensors
        self.draws = list(draws)
        self.position = 0

    def _next(self, kind: str | tuple[str, ...], shape: Sequence[int] | None) -> torch.Tensor:
        kinds = (kind,) if isinstance(kind, str) else kind
        if self.position >= len(self.draws):
            raise ReplayError(f"asked for a {kinds[0]} draw but all {len(self.draws)} recorded "
                              "draws are used up")
        rec = self.draws[self.position]
        if rec["kind"] not in kinds:
            raise ReplayError(f"draw #{self.position} ({rec['key']}) is a {rec['kind']!r} draw; "
                              f"the algorithm asked for {kinds[0]!r}")
        value = self.tensors[rec["key"]]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ReplayError(f"draw #{self.position} ({rec['key']}) has shape "
                              f"{tuple(value.shape)}; the algorithm asked for {tuple(shape)}")
        self.position += 1
        return value

    @property
    def exhausted(self) -> bool:
        return self.position == len(self.draws)

    def randn(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        return self._next(("randn", "randn_like"), shape).to(device=device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self._next(("randn_like", "randn"), x.shape).to(device=x.device, dtype=x.dtype)

    def randint(self, high: int, shape, device=None) -> torch.Tensor:
        return self._next("randint", shape).to(device=device, dtype=torch.long)

    def permutation(self, n: int, device=None) -> torch.Tensor:
        return self._next("shuffle", (n,)).to(device=device, dtype=torch.long)

    def truncnorm(self, low: float, high: float, mean: float, std: float) -> float:
        return float(self._next("truncnorm", None).reshape(-1)[0])


class RecordingDraws:
    """Wraps a draw source and records every draw, to write fixtures that :class:`ReplayDraws`
    (and hence ``python -m harmon.reference``) can replay."""

    def __init__(self, source):
        self.source = source
        self.records: list[dict] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def _keep(self, kind: str, value):
        key = f"draw_{len(self.records):04d}"
        t = torch.as_tensor(value).detach().cpu()
        t = t.reshape(1) if kind == "truncnorm" else t
        self.tensors[key] = t.to(torch.float64) if kind == "truncnorm" else t.contiguous()
        self.records.append({"index": len(self.records), "key": key, "kind": kind,
                             "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")})
        return value

    def randn(self, shape, device=None, dtype=torch.float32):
        return self._keep("randn", self.source.randn(shape, device=device, dtype=dtype))

    def randn_like(self, x):
        return self._keep("randn_like", self.source.randn_like(x))

    def randint(self, high, shape, device=None):
        return self._keep("randint", self.source.randint(high, shape, device=device))

    def permutation(self, n, device=None):
        return self._keep("shuffle", self.source.permutation(n, device=device))

    def truncnorm(self, low, high, mean, std):
        return self._keep("truncnorm", self.source.truncnorm(low, high, mean, std))

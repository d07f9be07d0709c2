"""Variance-preserving SDE: the continuous limit of DDPM (Song et al., 2021, eq. 11)."""
from __future__ import annotations

import math

import torch

from sde_lib.base import SDE, _finite_number, batch_time, broadcast_to


def standard_normal_logp(z: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """log N(z; 0, scale^2 I), per sample, summed over all non-batch dimensions."""
    dim = z[0].numel()
    sq = (z.reshape(z.shape[0], -1) ** 2).sum(dim=1)
    return -0.5 * dim * math.log(2 * math.pi * scale ** 2) - 0.5 * sq / scale ** 2


def standard_normal(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal draw, reproducible through `generator`."""
    if generator is not None and device is None:
        device = generator.device
    return torch.randn(*shape, generator=generator, device=device, dtype=dtype)


class VPSDE(SDE):
    """dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw with beta(t) = beta_min + t (beta_max - beta_min)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        if not (_finite_number(beta_min) and _finite_number(beta_max) and 0 <= beta_min < beta_max):
            raise ValueError(f"need finite numbers 0 <= beta_min < beta_max, got {beta_min!r}, {beta_max!r}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """Noise rate beta(t)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = int_0^t beta(s) ds."""
        return self.beta_min * t + 0.5 * t ** 2 * (self.beta_max - self.beta_min)

    def sde(self, x, t):
        t = batch_time(t, x)
        beta = self.beta(t)
        return -0.5 * broadcast_to(beta, x) * x, torch.sqrt(beta)

    def mean_coeff(self, t):
        return torch.exp(-0.5 * self.integrated_beta(t))  # eq. 29: alpha(t) = exp(-B(t)/2)

    def marginal_std(self, t):
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))  # sqrt(1 - exp(-B(t)))

    def prior_sampling(self, shape, generator=None, device=None, dtype=None):
        return standard_normal(shape, generator, device, dtype)

    def prior_logp(self, z):
        return standard_normal_logp(z)

    def discrete_betas(self, i: torch.Tensor) -> torch.Tensor:
        """DDPM's beta_i = beta_min/N + i (beta_max - beta_min) / (N (N-1)), i = 0..N-1."""
        if self.N < 2:
            raise ValueError("the DDPM chain needs N >= 2 steps")
        return self.beta_min / self.N + i * (self.beta_max - self.beta_min) / (self.N * (self.N - 1))

    def discretize(self, x, t):
        # DDPM (Ho et al., 2020, eq. 2): x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z
        beta = self.discrete_betas(self.discrete_index(t, x).to(x.dtype))
        f = broadcast_to(torch.sqrt(1.0 - beta), x) * x - x
        return f, torch.sqrt(beta)


class subVPSDE(VPSDE):
    """dx = -beta(t) x / 2 dt + sqrt(beta(t) (1 - exp(-2 B(t)))) dw (Song et al., 2021, eq. 12)."""

    def sde(self, x, t):
        t = batch_time(t, x)
        beta = self.beta(t)
        drift = -0.5 * broadcast_to(beta, x) * x
        return drift, torch.sqrt(beta * -torch.expm1(-2.0 * self.integrated_beta(t)))

    def marginal_std(self, t):
        return -torch.expm1(-self.integrated_beta(t))  # eq. 29: 1 - exp(-B(t))

    def discretize(self, x, t):
        return SDE.discretize(self, x, t)  # no published chain: Euler-Maruyama with dt = T/N

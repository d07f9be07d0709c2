"""Variance-exploding SDE: the continuous limit of SMLD / NCSN (Song et al., 2021, eq. 9)."""
from __future__ import annotations

import math

import torch

from sde_lib.base import SDE, _finite_number, batch_time
from sde_lib.vp import standard_normal, standard_normal_logp


class VESDE(SDE):
    """dx = sqrt(d sigma^2(t) / dt) dw with sigma(t) = sigma_min (sigma_max / sigma_min)^t.

    Convention of Song et al. (2021): the perturbation kernel is N(x(0), sigma(t)^2 I), i.e.
    x(0) is the data already perturbed with N(0, sigma_min^2 I); with that start the kernel is exact.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        if not (_finite_number(sigma_min) and _finite_number(sigma_max) and 0 < sigma_min < sigma_max):
            raise ValueError(f"need finite numbers 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level sigma(t)."""
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def sde(self, x, t):
        t = batch_time(t, x)
        # g(t) = sqrt(d sigma^2 / dt) = sigma(t) sqrt(2 log(sigma_max / sigma_min))
        return torch.zeros_like(x), self.sigma(t) * math.sqrt(2 * self.log_ratio)

    def mean_coeff(self, t):
        return torch.ones_like(t)

    def marginal_std(self, t):
        return self.sigma(t)

    def prior_sampling(self, shape, generator=None, device=None, dtype=None):
        return standard_normal(shape, generator, device, dtype) * self.sigma_max

    def prior_logp(self, z):
        return standard_normal_logp(z, self.sigma_max)

    def discrete_sigmas(self, i: torch.Tensor) -> torch.Tensor:
        """SMLD's geometric noise levels sigma_i, i = 0..N-1, from sigma_min to sigma_max."""
        if self.N < 2:
            raise ValueError("the SMLD chain needs N >= 2 noise levels")
        return self.sigma_min * torch.exp(i * self.log_ratio / (self.N - 1))

    def discretize(self, x, t):
        # SMLD (Song et al., 2021, eq. 8): x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z, sigma_{-1} = 0
        i = self.discrete_index(t, x)
        sigma = self.discrete_sigmas(i.to(x.dtype))
        previous = torch.where(i == 0, torch.zeros_like(sigma), self.discrete_sigmas((i - 1).to(x.dtype)))
        return torch.zeros_like(x), torch.sqrt(sigma ** 2 - previous ** 2)

"""EDM's sigma(t) = t process (Karras et al., 2022, sec. 4 and Table 1): x(t) = x(0) + t n on [0, sigma_max]."""
from __future__ import annotations

import torch

from sde_lib.base import SDE, _finite_number, batch_time
from sde_lib.vp import standard_normal, standard_normal_logp


class EDMSDE(SDE):
    """dx = sqrt(2 t) dw on [0, T] with T = sigma_max: f = 0, alpha(t) = 1, std(t) = t.

    Time is the noise level itself (EDM's sigma(t) = t, s(t) = 1), so `T` is sigma_max (80 in EDM), not 1:
    every sampler and the likelihood read the horizon from `sde.T` and `eps` is the smallest noise level
    sigma_min (the samplers' default 1e-3; EDM uses 0.002). d std^2 / dt = g^2 gives g(t) = sqrt(2 t).
    """

    def __init__(self, sigma_max: float = 80.0, N: int = 1000):
        super().__init__(N)
        if not (_finite_number(sigma_max) and sigma_max > 0):
            raise ValueError(f"need a finite number sigma_max > 0, got {sigma_max!r}")
        self.sigma_max = float(sigma_max)

    @property
    def T(self) -> float:
        """End time = the largest noise level sigma_max."""
        return self.sigma_max

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level sigma(t) = t."""
        return t

    def sde(self, x, t):
        t = batch_time(t, x)
        # Karras et al. (2022), eq. 4 with s = 1: g(t) = sqrt(2 sigma'(t) sigma(t)) = sqrt(2 t)
        return torch.zeros_like(x), torch.sqrt(2.0 * t.clamp_min(0))

    def mean_coeff(self, t):
        return torch.ones_like(t)

    def marginal_std(self, t):
        return t

    def prior_sampling(self, shape, generator=None, device=None, dtype=None):
        return standard_normal(shape, generator, device, dtype) * self.sigma_max

    def prior_logp(self, z):
        return standard_normal_logp(z, self.sigma_max)

"""Loss weightings and their time / sigma proposals for the one continuous DSM loss (issue 16).

Every weighting is written as a weight w on the sigma^2-weighted DSM term R(std s + z) (std = marginal std, z the
noise), in the sigma view sigma(t) = std(t) / alpha(t) (models/parameterization.py), where std s + z = (D - x0) / sigma
for the implied denoiser D:
  sigma2     w = 1                               (Song et al., 2021; DDPM's eps loss)
  likelihood w = g^2 / std^2                     (Song, Durkan et al., 2021: lambda = g^2)
  edm        w = (sigma^2 + sd^2) / sd^2         (Karras et al., 2022, eq. 8 and Table 1: lambda(sigma) ||D - x0||^2
                                                   with lambda = (sigma^2 + sd^2) / (sigma sd)^2 and ||D - x0||^2 =
                                                   sigma^2 R(std s + z))
  min_snr    w = min(1, gamma sigma^2)           (Hang et al., 2023: min(SNR, gamma) / SNR on the eps loss, SNR = 1/sigma^2)
A proposal draws t: uniform on [eps, T], importance (`losses.ImportanceTimeSampler`, likelihood only, same mean), or
lognormal: ln sigma ~ N(P_mean, P_std^2) truncated to [sigma(eps), sigma(T)] (EDM's training distribution, which
defines the EDM objective rather than re-weighting another one).
"""
from __future__ import annotations

import math

import torch

from errors import UserError
from sde_lib import SDE

WEIGHTINGS = ("sigma2", "likelihood", "edm", "min_snr")
PROPOSALS = ("uniform", "importance", "lognormal")


def sigma_of_t(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """sigma(t) = std(t) / alpha(t), the noise level of the scaled state x_t / alpha."""
    return sde.marginal_std(t) / sde.mean_coeff(t)


def t_of_sigma(sde: SDE, sigma: torch.Tensor, eps: float, iterations: int = 64) -> torch.Tensor:
    """The t in [eps, T] with sigma(t) = sigma (sigma(t) increases for every SDE here), by bisection in float64."""
    sigma = sigma.to(torch.float64)
    lo = torch.full_like(sigma, float(eps))
    hi = torch.full_like(sigma, float(sde.T))
    for _ in range(iterations):  # 64 halvings of [eps, T] reach float64 resolution
        mid = 0.5 * (lo + hi)
        below = sigma_of_t(sde, mid) < sigma
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def residual_weight(weighting: str, sde: SDE, t: torch.Tensor, x: torch.Tensor, *, sigma_data: float = 0.5,
                    gamma: float = 5.0) -> torch.Tensor:
    """(batch,) weight w(t) on R(std s + z) for `weighting` (module docstring); t (batch,)."""
    if weighting == "sigma2":
        return torch.ones_like(t)
    if weighting == "likelihood":
        _, g = sde.sde(x, t)
        return g ** 2 / sde.marginal_std(t) ** 2
    sigma = sigma_of_t(sde, t)
    if weighting == "edm":
        return (sigma ** 2 + sigma_data ** 2) / sigma_data ** 2
    if weighting == "min_snr":
        return torch.clamp(gamma * sigma ** 2, max=1.0)
    raise UserError(f"unknown training.weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


class LogNormalSigmaSampler:
    """Draws t with ln sigma(t) ~ N(p_mean, p_std^2) truncated to [sigma(eps), sigma(T)] (Karras et al., 2022, sec. 5)."""

    def __init__(self, sde: SDE, eps: float, p_mean: float = -1.2, p_std: float = 1.2):
        if not (math.isfinite(p_mean) and math.isfinite(p_std) and p_std > 0):
            raise UserError(f"training.p_mean must be finite and training.p_std > 0, got {p_mean}, {p_std}")
        if not 0 < eps < sde.T:
            raise UserError(f"training.eps must be in (0, T={sde.T}), got {eps}")
        ends = sigma_of_t(sde, torch.tensor([float(eps), float(sde.T)], dtype=torch.float64))
        self.cdf_lo, self.cdf_hi = (float(c) for c in torch.special.ndtr((torch.log(ends) - p_mean) / p_std))
        if self.cdf_hi - self.cdf_lo < 1e-6:
            raise UserError(f"the log-normal sigma proposal (P_mean={p_mean}, P_std={p_std}) puts no mass on this "
                            f"SDE's sigma range [{float(ends[0]):.3g}, {float(ends[1]):.3g}]")
        self.sde, self.eps, self.p_mean, self.p_std = sde, float(eps), float(p_mean), float(p_std)

    def sample(self, n: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        """n draws of t, on x's device and dtype (inverse CDF of the truncated normal in ln sigma)."""
        u = torch.rand(n, generator=generator, device=x.device, dtype=torch.float32).to(torch.float64)
        cdf = self.cdf_lo + (self.cdf_hi - self.cdf_lo) * u
        log_sigma = self.p_mean + self.p_std * torch.special.ndtri(cdf.clamp(1e-300, 1 - 1e-16))
        return t_of_sigma(self.sde, torch.exp(log_sigma), self.eps).to(x.dtype)

    def weight(self) -> float:
        """No re-weighting: the proposal is part of the EDM objective."""
        return 1.0


__all__ = ["WEIGHTINGS", "PROPOSALS", "sigma_of_t", "t_of_sigma", "residual_weight", "LogNormalSigmaSampler"]

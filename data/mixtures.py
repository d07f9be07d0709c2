"""Gaussian mixtures with exact densities and exact scores under every linear SDE.

If x(0) ~ sum_k w_k N(mu_k, diag(s_k^2)) and p_0t(x(t) | x(0)) = N(alpha(t) x(0), sigma(t)^2 I), then
x(t) ~ sum_k w_k N(alpha(t) mu_k, diag(alpha(t)^2 s_k^2 + sigma(t)^2)): a closed-form marginal and score.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sde_lib.base import SDE, batch_time


class GaussianMixture:
    """Mixture of Gaussians with isotropic (K,) or diagonal (K, d) component stds."""

    def __init__(self, weights: Sequence[float] | torch.Tensor, means, stds):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {tuple(weights.shape)}")
        if not (torch.isfinite(weights).all() and (weights > 0).all()):  # NaN <= 0 is False: checked explicitly
            raise ValueError("mixture weights must be positive finite numbers")
        if not (torch.isfinite(means).all() and torch.isfinite(stds).all()):
            raise ValueError("mixture means and stds must be finite")
        if stds.ndim == 0:
            stds = stds.expand(k)
        if stds.ndim == 1:
            if stds.shape != (k,):
                raise ValueError(f"isotropic stds must have shape ({k},), got {tuple(stds.shape)}")
            stds = stds[:, None].expand(k, d)
        if stds.shape != (k, d):
            raise ValueError(f"diagonal stds must have shape ({k}, {d}), got {tuple(stds.shape)}")
        if (stds <= 0).any():
            raise ValueError("component stds must be positive")
        self.weights = weights / weights.sum()
        self.means = means
        self.stds = stds.contiguous()

    @property
    def dim(self) -> int:
        """Dimension d of the data."""
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        """Number K of mixture components."""
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32,
               return_labels: bool = False):
        """Exact draws of n samples (and optionally their component labels)."""
        device = generator.device if generator is not None else "cpu"
        labels = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=device, dtype=torch.float64)
        x = (self.means.to(device)[labels] + self.stds.to(device)[labels] * z).to(dtype)
        return (x, labels) if return_labels else x

    # --- component log-densities ------------------------------------------------------
    def _component_logps(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """log w_k + log N(x; alpha mu_k, alpha^2 s_k^2 + sigma^2) for all k: (batch, K), plus the var and mean."""
        self._check_x(x)
        means = self.means.to(x)
        var = alpha[:, None, None] ** 2 * self.stds.to(x)[None] ** 2 + sigma[:, None, None] ** 2  # (B, K, d)
        mean = alpha[:, None, None] * means[None]  # (B, K, d)
        diff = x[:, None, :] - mean
        logp = -0.5 * (diff ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)
        return torch.log(self.weights.to(x))[None] + logp, diff, var

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():  # .to(x) would cast the means to ints
            kind = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating-point tensor, got {kind}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")

    def _coefficients(self, x, t, sde: SDE | None):
        if sde is None:
            return torch.ones(x.shape[0], dtype=x.dtype, device=x.device), torch.zeros(
                x.shape[0], dtype=x.dtype, device=x.device)
        t = batch_time(t, x)
        return sde.mean_coeff(t), sde.marginal_std(t)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of the mixture at x (batch, d)."""
        logps, _, _ = self._component_logps(x, *self._coefficients(x, 0.0, None))
        return torch.logsumexp(logps, dim=1)

    def marginal_log_prob(self, x: torch.Tensor, t: float | torch.Tensor, sde: SDE) -> torch.Tensor:
        """Exact log-density of x(t) when x(0) follows this mixture and evolves under `sde`."""
        logps, _, _ = self._component_logps(x, *self._coefficients(x, t, sde))
        return torch.logsumexp(logps, dim=1)

    def marginal_score(self, x: torch.Tensor, t: float | torch.Tensor, sde: SDE) -> torch.Tensor:
        """Exact score grad_x log p_t(x): the posterior-weighted component scores."""
        logps, diff, var = self._component_logps(x, *self._coefficients(x, t, sde))
        posterior = torch.softmax(logps, dim=1)  # p_t(k | x)
        return -(posterior[:, :, None] * diff / var).sum(1)

    def component_posterior(self, x: torch.Tensor, t: float | torch.Tensor = 0.0, sde: SDE | None = None) -> torch.Tensor:
        """p_t(k | x) for every component k: (batch, K). With sde=None, at the data (t = 0 without noise)."""
        logps, _, _ = self._component_logps(x, *self._coefficients(x, t, sde))
        return torch.softmax(logps, dim=1)

    def denoiser_at(self, x: torch.Tensor, alpha: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Exact E[x0 | alpha x0 + std n = x] for x0 from the mixture, n ~ N(0, I); alpha, std (batch,).

        Per component k the Gaussian posterior mean is mu_k + alpha s_k^2 (x - alpha mu_k) / (alpha^2 s_k^2 + std^2);
        they are averaged with the component posteriors p(k | x).
        """
        logps, diff, var = self._component_logps(x, alpha, std)
        posterior = torch.softmax(logps, dim=1)  # (B, K)
        means = self.means.to(x)[None] + alpha[:, None, None] * self.stds.to(x)[None] ** 2 * diff / var
        return (posterior[:, :, None] * means).sum(1)

    def denoiser(self, x: torch.Tensor, t: float | torch.Tensor, sde: SDE) -> torch.Tensor:
        """Exact denoiser E[x(0) | x(t) = x] under `sde` (Tweedie: score = (alpha D - x) / std^2)."""
        return self.denoiser_at(x, *self._coefficients(x, t, sde))

    def component(self, k: int) -> "GaussianMixture":
        """Component k alone, as a one-component mixture."""
        return GaussianMixture([1.0], self.means[k:k + 1], self.stds[k:k + 1])

    def score_fn(self, sde: SDE):
        """A `score_fn(x, t)` giving the exact marginal score under `sde` (for solvers and likelihood)."""
        return lambda x, t: self.marginal_score(x, t, sde)


def _ring2d() -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(torch.ones(8), means, torch.full((8,), 0.2))


def _grid2d() -> GaussianMixture:
    coords = torch.linspace(-2.0, 2.0, 5, dtype=torch.float64)
    means = torch.cartesian_prod(coords, coords)
    return GaussianMixture(torch.ones(25), means, torch.full((25,), 0.15))


def _mix64() -> GaussianMixture:
    g = torch.Generator().manual_seed(64)
    weights = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08], dtype=torch.float64)
    means = torch.randn(5, 64, generator=g, dtype=torch.float64)
    stds = 0.3 + 0.5 * torch.rand(5, 64, generator=g, dtype=torch.float64)
    return GaussianMixture(weights, means, stds)


TOY_MIXTURES = {"ring2d": _ring2d, "grid2d": _grid2d, "mix64": _mix64}


def toy_mixture(name: str) -> GaussianMixture:
    """The shipped analytic targets: "ring2d" (8 modes on a circle), "grid2d" (5x5), "mix64" (64-d, unequal weights)."""
    if name not in TOY_MIXTURES:
        raise ValueError(f"unknown toy mixture {name!r}; valid: {', '.join(TOY_MIXTURES)}")
    return TOY_MIXTURES[name]()

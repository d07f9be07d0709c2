"""Time-step schedules for the fixed-step fast samplers, and the log-SNR <-> time maps they rely on.

All grids are computed once, before a sampler's loop, in float64 on the CPU (they are a handful of
scalars); samplers cast them to the sample's device and dtype in one transfer.

Notation (Lu et al. 2022, DPM-Solver, sec. 2): alpha(t) = sde.mean_coeff(t), sigma(t) = sde.marginal_std(t),
log-SNR lambda(t) = log(alpha(t) / sigma(t)), strictly decreasing in t for every SDE of the toolkit.
Karras et al. (2022) work with the noise level sigma_edm(t) = sigma(t) / alpha(t) = exp(-lambda(t)).
"""
from __future__ import annotations

import math

import torch

from errors import UserError
from sde_lib import SDE, EDMSDE, VESDE, VPSDE, subVPSDE

SCHEDULES = ("uniform", "quadratic", "logsnr", "karras")


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def log_snr(sde: SDE, t) -> torch.Tensor:
    """lambda(t) = log alpha(t) - log sigma(t), in float64."""
    t = _f64(t)
    return torch.log(sde.mean_coeff(t)) - torch.log(sde.marginal_std(t))


def _vp_time_of_integrated_beta(sde: VPSDE, big_b: torch.Tensor) -> torch.Tensor:
    """Solve B(t) = beta_min t + (beta_max - beta_min) t^2 / 2 for t >= 0 (cancellation-free root)."""
    b0, db = sde.beta_min, sde.beta_max - sde.beta_min
    return 2.0 * big_b / (torch.sqrt(b0 ** 2 + 2.0 * db * big_b) + b0)


def time_of_log_snr(sde: SDE, lam) -> torch.Tensor:
    """Inverse t(lambda) of the log-SNR: closed forms for VP, sub-VP and VE, bisection for any other SDE."""
    lam = _f64(lam)
    if isinstance(sde, subVPSDE):
        # alpha = u = exp(-B/2), sigma = 1 - u^2, so e^lambda = r = u / (1 - u^2): r u^2 + u - r = 0 and
        # u = 2r / (1 + sqrt(1 + 4r^2)); 1 - u is formed without cancellation for u -> 1 (small t).
        r = torch.exp(lam)
        root = torch.sqrt(1.0 + 4.0 * r ** 2)
        one_minus_u = (1.0 + 1.0 / (root + 2.0 * r)) / (1.0 + root)
        return _vp_time_of_integrated_beta(sde, -2.0 * torch.log1p(-one_minus_u))
    if isinstance(sde, VPSDE):
        # DPM-Solver, appendix: lambda = -log(e^B - 1) / 2, so B = log(1 + e^{-2 lambda}) = softplus(-2 lambda).
        return _vp_time_of_integrated_beta(sde, torch.nn.functional.softplus(-2.0 * lam))
    if isinstance(sde, VESDE):
        # alpha = 1, sigma = sigma_min (sigma_max / sigma_min)^t.
        return (-lam - math.log(sde.sigma_min)) / sde.log_ratio
    if isinstance(sde, EDMSDE):
        return torch.exp(-lam)  # alpha = 1, sigma = t
    return time_of_log_snr_bisection(sde, lam)


def time_of_log_snr_bisection(sde: SDE, lam, iterations: int = 100) -> torch.Tensor:
    """t(lambda) by vectorised bisection on [0, T] (lambda(t) is decreasing); lambda outside the range clamps."""
    lam = _f64(lam)
    lo = torch.zeros_like(lam)  # lambda(lo) >= lam
    hi = torch.full_like(lam, sde.T)  # lambda(hi) <= lam
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = log_snr(sde, mid.clamp_min(1e-300)) > lam  # target lies later in time
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def edm_sigma(sde: SDE, t) -> torch.Tensor:
    """Karras et al.'s noise level sigma(t) / alpha(t) = exp(-lambda(t)), float64."""
    t = _f64(t)
    return sde.marginal_std(t) / sde.mean_coeff(t)


def check_eps(sde: SDE, eps: float, name: str) -> float:
    """The end time eps as a float in (0, T), else a UserError."""
    eps = float(eps)
    if not 0.0 < eps < sde.T:
        raise UserError(f"{name}: eps must lie in (0, {sde.T}), got {eps}")
    return eps


def time_grid(sde: SDE, n_steps: int, eps: float, schedule: str = "uniform", rho: float = 7.0) -> torch.Tensor:
    """n_steps + 1 decreasing times from T to eps (float64, CPU), spaced by the named schedule.

    uniform:   equal steps in t.
    quadratic: t = eps + (T - eps) (i / n)^2 (DDIM, Song, Meng & Ermon 2021, appendix D.2).
    logsnr:    equal steps in lambda = log(alpha / sigma) (DPM-Solver, sec. 3.3).
    karras:    sigma_edm^(1/rho) equally spaced from sigma_edm(T) to sigma_edm(eps) (Karras et al. 2022, eq. 5),
               mapped back to t through the SDE's own noise schedule.
    """
    if schedule not in SCHEDULES:
        raise UserError(f"unknown time-step schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if int(n_steps) < 1:
        raise UserError(f"a time grid needs at least one step, got {n_steps}")
    n = int(n_steps)
    frac = torch.arange(n + 1, dtype=torch.float64) / n  # 0 .. 1, from T to eps
    T = float(sde.T)
    if schedule == "uniform":
        grid = T + frac * (eps - T)
    elif schedule == "quadratic":
        grid = eps + (T - eps) * (1.0 - frac) ** 2
    elif schedule == "logsnr":
        lam_T, lam_eps = log_snr(sde, T), log_snr(sde, eps)
        grid = time_of_log_snr(sde, lam_T + frac * (lam_eps - lam_T))
    else:
        if rho <= 0:
            raise UserError(f"karras schedule: rho must be positive, got {rho}")
        s_max, s_min = edm_sigma(sde, T) ** (1.0 / rho), edm_sigma(sde, eps) ** (1.0 / rho)
        grid = time_of_log_snr(sde, -rho * torch.log(s_max + frac * (s_min - s_max)))
    grid[0], grid[-1] = T, eps  # exact end points despite round-off in the maps
    return grid

"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, algorithm 1, no churn).

Two parameterisations of the same ODE, both valid for every SDE of the toolkit:

- variable="sigma" (default, Karras et al.'s recommended sigma(t) = t, s(t) = 1 form): the state is
  x_hat = x / alpha(t), the time variable the noise level sigma_edm = sigma(t) / alpha(t), and the ODE is
  d x_hat / d sigma_edm = (x_hat - D(x_hat; sigma_edm)) / sigma_edm = eps_hat(x, t)  with eps_hat = -sigma score.
- variable="t": the PF-ODE dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 (Song et al. 2021, eq. 13) stepped in t.

Steps follow `schedule` (uniform / quadratic / logsnr / karras with `rho`). A Heun step costs two score
evaluations; the last step is a single Euler stage when the budget is odd (as algorithm 1's final step), and a
full Heun step when it is even (t = eps > 0, so the second stage is well defined), so nfe_used == nfe.

`edm_stochastic` is Karras et al.'s algorithm 2 in the same (sigma_edm, x / alpha) view, so it runs on every SDE:
before step i, if S_tmin <= sigma_i <= S_tmax, the noise level is raised to sigma_hat = sigma_i (1 + gamma_i),
gamma_i = min(S_churn / steps, sqrt(2) - 1), by adding N(0, S_noise^2 (sigma_hat^2 - sigma_i^2)) noise to x / alpha
(eq. 7-8 of sec. 4), and the Heun step runs from sigma_hat. sigma_hat is capped at sigma_edm(T) (the largest noise
level the SDE, and a network trained on [eps, T], covers), so the first step never churns. S_churn = 0 is `heun`.
"""
from __future__ import annotations

import math

import torch

from errors import UserError
from solvers.common import check_budget, check_choice, gaussian_like, initial_state
from solvers.registry import register
from solvers.timesteps import check_eps, edm_sigma, time_grid, time_of_log_snr


def _rows(sde, t):
    """(t, alpha, std, sigma_edm) rows of the float64 times t."""
    return torch.stack([t, sde.mean_coeff(t), sde.marginal_std(t), edm_sigma(sde, t)], dim=1)


def _churn(sde, grid, s_churn, s_tmin, s_tmax, s_noise):
    """Per step: the raised rows (t_hat, ..., sigma_hat), the added noise std and whether the step churns at all
    (Karras et al. 2022, alg. 2)."""
    sigma, steps = edm_sigma(sde, grid[:-1]), grid.numel() - 1
    gamma = torch.where((sigma >= s_tmin) & (sigma <= s_tmax),
                        torch.full_like(sigma, min(s_churn / steps, math.sqrt(2.0) - 1.0)), torch.zeros_like(sigma))
    gamma = torch.minimum(gamma, edm_sigma(sde, grid[0]) / sigma - 1.0)  # sigma_hat <= sigma_edm(T)
    sigma_hat = sigma * (1.0 + gamma)
    t_hat = torch.where(gamma > 0, time_of_log_snr(sde, -torch.log(sigma_hat)), grid[:-1]).clamp(grid[-1], grid[0])
    noise = s_noise * torch.sqrt((sigma_hat ** 2 - sigma ** 2).clamp_min(0))
    return _rows(sde, t_hat), noise, gamma > 0


def _sigma_space(sde, score_fn, x, grid, last_heun, churn=None, generator=None):
    """Heun in (sigma_edm, x / alpha), with algorithm 2's churn when `churn` = (rows, noise, raised); returns x at
    grid[-1]."""
    table = _rows(sde, grid).to(device=x.device, dtype=x.dtype)
    batch, steps = x.shape[0], grid.numel() - 1
    raised = [False] * steps if churn is None else churn[2].tolist()  # decided on the host, before the loop
    if churn is not None:
        hats, noise = churn[0].to(device=x.device, dtype=x.dtype), churn[1].to(device=x.device, dtype=x.dtype)

    def slope(x_hat, row):  # d x_hat / d sigma_edm = eps_hat(alpha x_hat, t)
        t, alpha, sigma, _ = row
        return -sigma * score_fn(alpha * x_hat, t.expand(batch))

    x_hat = x / table[0, 1]
    for i in range(steps):
        here, there = table[i], table[i + 1]
        if raised[i]:  # eq. 7-8: x_hat <- x_hat + sqrt(sigma_hat^2 - sigma_i^2) S_noise n, then step from sigma_hat
            here = hats[i]
            x_hat = x_hat + noise[i] * gaussian_like(x_hat, generator)
        h = there[3] - here[3]
        d = slope(x_hat, here)
        x_next = x_hat + h * d
        if i < steps - 1 or last_heun:
            x_next = x_hat + 0.5 * h * (d + slope(x_next, there))
        x_hat = x_next
    return table[-1, 1] * x_hat


def _time_space(sde, score_fn, x, grid, last_heun):
    """Heun on dx/dt = f - g^2 score / 2 in t; returns x at the last grid time."""
    flow = sde.reverse(score_fn, probability_flow=True)
    times = grid.to(device=x.device, dtype=x.dtype)
    batch, steps = x.shape[0], grid.numel() - 1
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        d = flow.sde(x, t.expand(batch))[0]
        x_next = x + h * d
        if i < steps - 1 or last_heun:
            x_next = x + 0.5 * h * (d + flow.sde(x_next, t_next.expand(batch))[0])
        x = x_next
    return x


@register("heun")
def heun_sampler(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, schedule: str = "karras",
                 rho: float = 7.0,
                 variable: str = "sigma", device=None, dtype=None):
    """Deterministic Heun sampler of the PF-ODE using exactly `nfe` score evaluations."""
    budget = check_budget(nfe, 35, "heun")
    eps = check_eps(sde, eps, "heun")
    check_choice(variable, ("sigma", "t"), "heun variable")
    steps, last_heun = (budget + 1) // 2, budget % 2 == 0
    x = initial_state(sde, shape, x_T, generator, device, dtype)
    grid = time_grid(sde, steps, eps, schedule, rho)
    solve = _sigma_space if variable == "sigma" else _time_space
    return solve(sde, score_fn, x, grid, last_heun), budget


@register("edm_stochastic")
def edm_stochastic_sampler(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None,
                           S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = float("inf"),
                           S_noise: float = 1.0, rho: float = 7.0, device=None, dtype=None):
    """EDM's stochastic sampler (Karras et al. 2022, algorithm 2) on the Karras schedule; exactly `nfe` evaluations."""
    budget = check_budget(nfe, 35, "edm_stochastic")
    eps = check_eps(sde, eps, "edm_stochastic")
    values = {"S_churn": S_churn, "S_tmin": S_tmin, "S_tmax": S_tmax, "S_noise": S_noise}
    bad = [f"{k}={v}" for k, v in values.items() if not float(v) >= 0]
    if bad or S_tmin > S_tmax:
        raise UserError(f"edm_stochastic: need S_churn, S_noise >= 0 and 0 <= S_tmin <= S_tmax, got "
                        f"{', '.join(f'{k}={v}' for k, v in values.items())}")
    steps, last_heun = (budget + 1) // 2, budget % 2 == 0
    x = initial_state(sde, shape, x_T, generator, device, dtype)
    grid = time_grid(sde, steps, eps, "karras", rho)
    churn = _churn(sde, grid, float(S_churn), float(S_tmin), float(S_tmax), float(S_noise))
    return _sigma_space(sde, score_fn, x, grid, last_heun, churn, generator), budget

"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, algorithm 1, no churn).

Two parameterisations of the same ODE, both valid for every SDE of the toolkit:

- variable="sigma" (default, Karras et al.'s recommended sigma(t) = t, s(t) = 1 form): the state is
  x_hat = x / alpha(t), the time variable the noise level sigma_edm = sigma(t) / alpha(t), and the ODE is
  d x_hat / d sigma_edm = (x_hat - D(x_hat; sigma_edm)) / sigma_edm = eps_hat(x, t)  with eps_hat = -sigma score.
- variable="t": the PF-ODE dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 (Song et al. 2021, eq. 13) stepped in t.

Steps follow `schedule` (uniform / quadratic / logsnr / karras with `rho`). A Heun step costs two score
evaluations; the last step is a single Euler stage when the budget is odd (as algorithm 1's final step), and a
full Heun step when it is even (t = eps > 0, so the second stage is well defined), so nfe_used == nfe.
"""
from __future__ import annotations

import torch

from solvers.common import check_budget, check_choice, initial_state
from solvers.registry import register
from solvers.timesteps import check_eps, edm_sigma, time_grid


def _sigma_space(sde, score_fn, x, grid, last_heun):
    """Heun in (sigma_edm, x / alpha); returns x at the last grid time."""
    table = torch.stack([grid, sde.mean_coeff(grid), sde.marginal_std(grid), edm_sigma(sde, grid)], dim=1)
    table = table.to(device=x.device, dtype=x.dtype)
    batch, steps = x.shape[0], grid.numel() - 1

    def slope(x_hat, row):  # d x_hat / d sigma_edm = eps_hat(alpha x_hat, t)
        t, alpha, sigma, _ = row
        return -sigma * score_fn(alpha * x_hat, t.expand(batch))

    x_hat = x / table[0, 1]
    for i in range(steps):
        here, there = table[i], table[i + 1]
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

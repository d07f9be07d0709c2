"""DDIM (Song, Meng & Ermon 2021) in continuous time for the variance-preserving family.

One step from t to s < t with alpha = sde.mean_coeff, sigma = sde.marginal_std and the noise prediction
eps_hat = -sigma(t) score(x, t) (DDIM eq. 12):

    x0_hat = (x - sigma_t eps_hat) / alpha_t
    x_s    = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
    c^2    = eta^2 sigma_s^2 sigma_{t|s}^2 / sigma_t^2,   sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2.

sigma_{t|s}^2 is the variance of the forward transition x_t | x_s of any linear SDE, so c^2 at eta = 1 is the
variance of the DDPM posterior q(x_s | x_t, x_0) (DDIM eq. 16; for VP it is beta_tilde =
(1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s)), and eta = 0 is the deterministic DDIM map, the exact
first-order exponential integrator of the probability-flow ODE (= DPM-Solver-1).

sub-VP (alpha^2 + sigma^2 != 1): the step above never uses alpha^2 + sigma^2 = 1 (only the Gaussian kernel
N(alpha x0, sigma^2) and its Markov transition), so it is applied unchanged; eta = 1 is then ancestral
sampling from the sub-VP posterior and eta = 0 the exponential integrator of the sub-VP PF-ODE.
VE is refused: DDIM is the DDPM family's sampler; on VE use `heun` (its Euler stage is DDIM's eta = 0 map).
"""
from __future__ import annotations

import torch

from errors import UserError
from solvers.common import VP_FAMILY, check_budget, gaussian_like, initial_state, require_sde
from solvers.registry import register
from solvers.timesteps import check_eps, time_grid


def ddim_coefficients(sde, t_from: torch.Tensor, t_to: torch.Tensor, eta: float):
    """Per-step (alpha_t, sigma_t, alpha_s, eps coefficient sqrt(sigma_s^2 - c^2), noise std c), float64."""
    t_from, t_to = t_from.to(torch.float64), t_to.to(torch.float64)
    a_t, s_t = sde.mean_coeff(t_from), sde.marginal_std(t_from)
    a_s, s_s = sde.mean_coeff(t_to), sde.marginal_std(t_to)
    transition_var = (s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2).clamp_min(0.0)  # sigma_{t|s}^2
    noise_var = eta ** 2 * s_s ** 2 * transition_var / s_t ** 2
    return a_t, s_t, a_s, torch.sqrt((s_s ** 2 - noise_var).clamp_min(0.0)), torch.sqrt(noise_var)


@register("ddim")
def ddim_sampler(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, eta: float = 0.0,
                 schedule: str = "uniform", device=None, dtype=None):
    """DDIM with `eta` (0: deterministic, 1: DDPM posterior variance) over `nfe` steps of the named schedule."""
    require_sde(sde, VP_FAMILY, "ddim")
    steps = check_budget(nfe, 50, "ddim")
    eps = check_eps(sde, eps, "ddim")
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"ddim: eta must lie in [0, 1], got {eta}")
    x = initial_state(sde, shape, x_T, generator, device, dtype)
    grid = time_grid(sde, steps, eps, schedule)
    table = torch.stack([grid[:-1], *ddim_coefficients(sde, grid[:-1], grid[1:], eta)], dim=1)
    table = table.to(device=x.device, dtype=x.dtype)  # one transfer; the loop only indexes it
    batch = x.shape[0]
    for i in range(steps):
        t, a_t, s_t, a_s, c_eps, c_noise = table[i]
        eps_hat = -s_t * score_fn(x, t.expand(batch))
        x0_hat = (x - s_t * eps_hat) / a_t
        x = a_s * x0_hat + c_eps * eps_hat
        if eta > 0.0:
            x = x + c_noise * gaussian_like(x, generator)
    return x, steps

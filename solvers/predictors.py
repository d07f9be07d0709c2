"""Predictors of the PC sampler (Song et al., 2021, sec. 4.2 and app. F): one step of a reverse-time solver.

A predictor moves x from time t to the next time of its grid. Chain predictors (reverse diffusion, ancestral)
step through the SDE's own discrete chain re-spaced to n steps (`with_steps`), chain index i = n-1 .. 0.
"""
from __future__ import annotations

from typing import Callable

import torch

from errors import UserError
from sde_lib import SDE, VESDE, VPSDE, batch_time, broadcast_to
from solvers.common import require_sde, with_steps

Noise = Callable[[], torch.Tensor]


class Predictor:
    """Base class: `update(x, t, t_next, i, noise) -> (x, x_mean)`; `nfe_per_step` score evaluations each."""

    nfe_per_step = 1
    chain = False  # True: the grid is the chain's n times from T down to eps, one per chain index

    def __init__(self, sde: SDE, score_fn: Callable, n_steps: int):
        self.sde = sde
        self.score_fn = score_fn
        self.n_steps = int(n_steps)

    def grid(self, eps: float, device, dtype) -> torch.Tensor:
        """n+1 times: step k goes from grid[k] to grid[k+1] and evaluates the score at grid[k]."""
        if self.chain:
            # The chain's times t_i = eps + (T - eps) i / (n-1), i = n-1..0 (Song et al.'s linspace(T, eps, N));
            # the final entry is unused by chain predictors (their last step ends at the data).
            times = torch.linspace(self.sde.T, eps, self.n_steps, device=device, dtype=dtype)
            return torch.cat([times, times.new_full((1,), eps)])
        return torch.linspace(self.sde.T, eps, self.n_steps + 1, device=device, dtype=dtype)

    def update(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, i: int, noise: Noise):
        raise NotImplementedError


class EulerMaruyamaPredictor(Predictor):
    """Euler-Maruyama step of the reverse SDE (eq. 6): x <- x - f_rev dt + g sqrt(dt) z, dt = t - t_next."""

    def __init__(self, sde, score_fn, n_steps):
        super().__init__(sde, score_fn, n_steps)
        self.rsde = sde.reverse(score_fn)

    def update(self, x, t, t_next, i, noise):
        dt = t - t_next
        drift, diffusion = self.rsde.sde(x, t)
        x_mean = x - drift * dt
        return x_mean + broadcast_to(diffusion, x) * torch.sqrt(dt) * noise(), x_mean


class _ChainPredictor(Predictor):
    """Steps through the SDE's discrete chain with n steps (DDPM betas / SMLD sigmas re-spaced to n)."""

    chain = True

    def __init__(self, sde, score_fn, n_steps):
        super().__init__(sde, score_fn, n_steps)
        if self.n_steps < 2:
            raise UserError(f"{type(self).__name__}: the discrete chain needs at least 2 steps, got {n_steps}")
        self.chain_sde = with_steps(sde, self.n_steps)
        if type(sde) is VPSDE:
            # DDPM's beta_i = beta_max / n at the top of an n-step chain; it must stay below 1.
            top = float(self.chain_sde.discrete_betas(torch.tensor(float(self.n_steps - 1))))
            if top >= 1.0:
                raise UserError(f"{type(self).__name__}: a {self.n_steps}-step DDPM chain has beta = {top:.3g} >= 1; "
                                f"use more steps (n > beta_max = {sde.beta_max}) or another predictor")

    def chain_time(self, i: int, t: torch.Tensor) -> float | torch.Tensor:
        """The time handed to the chain's `discretize` for chain index i (score time t on the grid).

        DDPM's and SMLD's steps depend on t only through `discrete_index`; the middle of index i's interval,
        (i + 1/2) T / (n-1), maps to i whatever the float rounding (i T / (n-1) itself fails in float32 for
        n ~ 10^4). Other chains (sub-VP: Euler-Maruyama) use the grid time.
        """
        if type(self.sde) in (VPSDE, VESDE):
            return (i + 0.5) * self.sde.T / (self.n_steps - 1)
        return t


class ReverseDiffusionPredictor(_ChainPredictor):
    """Reverse of the forward chain's own step (Song et al., 2021, eq. 46): x_{i-1} = x_i - f_i + G_i^2 s + G_i z."""

    def update(self, x, t, t_next, i, noise):
        # The score is evaluated at the grid time t; the chain coefficients are those of chain index i.
        rsde = self.chain_sde.reverse(lambda y, _: self.score_fn(y, batch_time(t, y)))
        f, G = rsde.discretize(x, self.chain_time(i, t))
        x_mean = x - f
        return x_mean + broadcast_to(G, x) * noise(), x_mean


class AncestralPredictor(_ChainPredictor):
    """Ancestral sampling: DDPM's reverse step for VP (Ho et al., 2020, alg. 2), SMLD's for VE (Song et al., eq. 47)."""

    def __init__(self, sde, score_fn, n_steps):
        require_sde(sde, (VPSDE, VESDE), "ancestral")
        super().__init__(sde, score_fn, n_steps)

    def update(self, x, t, t_next, i, noise):
        index = torch.full((x.shape[0],), float(i), dtype=x.dtype, device=x.device)
        score = self.score_fn(x, batch_time(t, x))
        if isinstance(self.sde, VESDE):
            sigma = self.chain_sde.discrete_sigmas(index)
            previous = self.chain_sde.discrete_sigmas(index - 1) if i > 0 else torch.zeros_like(sigma)
            # x_{i-1} = x_i + (sigma_i^2 - sigma_{i-1}^2) s + sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2) z
            jump = sigma ** 2 - previous ** 2
            x_mean = x + broadcast_to(jump, x) * score
            std = torch.sqrt(previous ** 2 * jump / sigma ** 2)
        else:
            beta = self.chain_sde.discrete_betas(index)
            # x_{i-1} = (x_i + beta_i s) / sqrt(1 - beta_i) + sqrt(beta_i) z
            x_mean = (x + broadcast_to(beta, x) * score) / broadcast_to(torch.sqrt(1.0 - beta), x)
            std = torch.sqrt(beta)
        return x_mean + broadcast_to(std, x) * noise(), x_mean


class NonePredictor(Predictor):
    """Leaves x unchanged (corrector-only sampling); no score evaluations."""

    nfe_per_step = 0
    chain = True

    def update(self, x, t, t_next, i, noise):
        return x, x


PREDICTORS: dict[str, type[Predictor]] = {
    "euler_maruyama": EulerMaruyamaPredictor,
    "reverse_diffusion": ReverseDiffusionPredictor,
    "ancestral": AncestralPredictor,
    "none": NonePredictor,
}

"""Predictor-corrector sampler (Song et al., 2021, alg. 1) and its one-predictor special cases."""
from __future__ import annotations

import torch

from errors import UserError
from solvers.common import (CountingScore, check_budget, check_choice, gaussian_like, initial_state,
                            steps_for_budget, tweedie_denoise)
from solvers.correctors import CORRECTORS
from solvers.predictors import PREDICTORS
from solvers.registry import register


@torch.no_grad()
def pc_sample(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None,
              predictor: str = "reverse_diffusion", corrector: str = "langevin", snr: float = 0.16,
              corrector_steps: int = 1, step_size: float | None = None, noise_removal: bool = True,
              denoise: bool = False, device=None, dtype=None, name: str = "pc"):
    """Any predictor x any corrector; returns (samples, nfe_used).

    The budget `nfe` buys n steps of (predictor + corrector_steps corrector evaluations), plus one evaluation for the
    optional final Tweedie denoising at t = eps (`denoise`). `noise_removal` drops the noise of the last step.
    """
    check_choice(predictor, PREDICTORS, "predictor")
    check_choice(corrector, CORRECTORS, "corrector")
    counter = CountingScore(score_fn)
    corr = CORRECTORS[corrector](sde, counter, corrector_steps=corrector_steps, snr=snr, t_min=eps,
                                   step_size=step_size)
    cost = PREDICTORS[predictor].nfe_per_step + corr.nfe_per_step
    if cost == 0:
        raise UserError(f"{name}: predictor 'none' with corrector 'none' does nothing")
    fixed = 1 if denoise else 0
    budget = check_budget(nfe, sde.N * cost + fixed, name)
    n = steps_for_budget(budget, cost, fixed, name)
    pred = PREDICTORS[predictor](sde, counter, n)

    x = initial_state(sde, shape, x_T, generator, device, dtype)
    times = pred.grid(eps, x.device, x.dtype)

    def noise() -> torch.Tensor:
        return gaussian_like(x, generator)

    x_mean = x
    for k in range(n):
        t, t_next = times[k], times[k + 1]
        x, x_mean = corr.update(x, t, noise)
        x, x_mean = pred.update(x, t, t_next, n - 1 - k, noise)
    if noise_removal:
        x = x_mean
    if denoise:
        x = tweedie_denoise(sde, counter, x, eps)
    return x, counter.calls


def _one_predictor(predictor: str):
    def sampler(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, noise_removal=True,
                denoise=False, device=None, dtype=None):
        return pc_sample(sde, score_fn, shape, nfe=nfe, eps=eps, x_T=x_T, generator=generator,
                         predictor=predictor, corrector="none", noise_removal=noise_removal, denoise=denoise,
                         device=device, dtype=dtype, name=predictor)
    sampler.__doc__ = f"Predictor {predictor!r} alone (no corrector); returns (samples, nfe_used)."
    return sampler


register("pc")(pc_sample)
em_sample = register("em")(_one_predictor("euler_maruyama"))
reverse_diffusion_sample = register("reverse_diffusion")(_one_predictor("reverse_diffusion"))
ancestral_sample = register("ancestral")(_one_predictor("ancestral"))

"""The DDPM variational bound in bits/dim for VP models in discrete time (Ho et al., 2020, eq. 5 and 13).

Notation of Ho et al. with T = sde.N steps: beta_t = sde.discrete_betas(t - 1), alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s, x_0 the image in the model range (k/255 scaled by y = a x + b, no
dequantization). The noise-prediction function is called on 0-based indices i = t - 1, as the
discrete models of Song et al. are (label i = t_cont (N - 1)):  eps_fn(x_t, i) ~ eps.

    L = L_T + sum_{t=2}^T L_{t-1} + L_0                                          (eq. 5)
    L_T     = KL(q(x_T | x_0) || N(0, I)),  q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),  x_t ~ q(x_t | x_0)
        q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I),                              (eq. 6, 7)
        mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
        p(x_{t-1} | x_t) = N(mu_t, sigma_t^2 I),  mu_t = (x_t - beta_t / sqrt(1 - abar_t) eps_fn(x_t)) / sqrt(alpha_t)  (eq. 11)
    L_0     = -log p(x_0 | x_1): the discretized Gaussian decoder of eq. 13, bins of width a/255 around
              x_0 with the first and last bins extended to -inf and +inf.

sigma_t^2 = beta_t ("fixedlarge") or beta~_t ("fixedsmall"); as in the implementation of Ho et al. the
decoder (t = 1, where beta~_1 = 0) uses sigma_1^2 = beta~_2 in both cases. Every term is evaluated
(T network calls per image, one fresh x_t per term), or `num_terms` of the L_1..L_{T-1} terms drawn
uniformly per image give an unbiased estimate of their sum. The result is -log P(k) bounded above,
in bits per dimension, with no dequantization offset (the decoder is already discrete).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from errors import UserError
from likelihood.bpd import check_uint8_images
from sde_lib.base import ScoreFn, broadcast_to
from sde_lib.vp import VPSDE, subVPSDE

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VARIANCES = ("fixedlarge", "fixedsmall")


class DDPMSchedule:
    """beta_t, abar_t and the posterior/decoder variances of the T-step DDPM chain of a VP SDE, t = 1..T."""

    def __init__(self, sde: VPSDE, dtype: torch.dtype = torch.float64, device=None):
        if not isinstance(sde, VPSDE) or isinstance(sde, subVPSDE):
            raise UserError(f"the DDPM bound needs a VP SDE (DDPM chain), got {type(sde).__name__}")
        self.T = sde.N
        if self.T < 2:
            raise UserError("the DDPM bound needs N >= 2 steps")
        i = torch.arange(self.T, dtype=torch.float64)
        betas = sde.discrete_betas(i)
        if not bool((betas < 1).all()):  # 1 - beta <= 0: abar and the KL terms are NaN
            raise UserError(f"the DDPM chain of N={sde.N} steps has beta up to {float(betas.max()):g} >= 1: "
                            f"it needs N > beta_max = {sde.beta_max:g}")
        abar = torch.cumprod(1.0 - betas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])

        def pad(v: torch.Tensor) -> torch.Tensor:  # stored 1-based (index 0 unused) to read like the paper
            return torch.cat([torch.full((1,), float("nan"), dtype=torch.float64), v]).to(dtype=dtype, device=device)

        self.betas = pad(betas)
        self.abar = pad(abar)
        self.abar_prev = pad(abar_prev)
        self.posterior_var = pad((1.0 - abar_prev) / (1.0 - abar) * betas)  # beta~_t (eq. 7)

    def model_var(self, t: torch.Tensor, variance: str) -> torch.Tensor:
        """sigma_t^2 of p(x_{t-1} | x_t) for 1-based t; at t = 1 (the decoder) beta~_2 as Ho et al. do."""
        var = self.betas[t] if variance == "fixedlarge" else self.posterior_var[t]
        return torch.where(t == 1, self.posterior_var[2].expand_as(var), var)


def eps_fn_from_score(sde: VPSDE, score_fn: ScoreFn) -> EpsFn:
    """Noise prediction eps(x, i) = -sqrt(1 - abar_{i+1}) score(x, t_i) with t_i = i T / (N - 1) (Song et al. discrete labels)."""
    schedule = DDPMSchedule(sde)

    def eps_fn(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        t = sde.step_time(i, x.dtype)  # label t (N - 1) truncates to i, so the score's std is std_i
        std = torch.sqrt(1.0 - schedule.abar.to(x.device)[i + 1]).to(x.dtype)
        return -broadcast_to(std, x) * score_fn(x, t)

    return eps_fn


def gaussian_kl(mean1, var1, mean2, var2) -> torch.Tensor:
    """KL(N(mean1, var1 I) || N(mean2, var2 I)) summed over non-batch dims; variances are (batch,)."""
    v1, v2 = broadcast_to(var1, mean1), broadcast_to(var2, mean1)
    kl = 0.5 * (torch.log(v2 / v1) + v1 / v2 + (mean1 - mean2) ** 2 / v2 - 1.0)
    return kl.flatten(1).sum(1)


def _log_cdf_difference(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, computed on the side of the tail where it is accurate."""
    flip = lo > 0  # both in the upper tail: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(torch.clamp(log_lo - log_hi, max=0.0)).clamp(max=1 - 1e-12))


def discretized_gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, half_width: float,
                             low: float, high: float) -> torch.Tensor:
    """-log of the decoder mass of eq. 13: bins [x0 - h, x0 + h] (h = half bin width), edge bins at `low`/`high` open."""
    std = broadcast_to(torch.sqrt(var), x0)
    upper = torch.where(x0 >= high - half_width / 2, torch.full_like(x0, math.inf), (x0 + half_width - mean) / std)
    lower = torch.where(x0 <= low + half_width / 2, torch.full_like(x0, -math.inf), (x0 - half_width - mean) / std)
    return -_log_cdf_difference(lower, upper).flatten(1).sum(1)


def ddpm_bound_terms(sde: VPSDE, eps_fn: EpsFn, images, data_scale: tuple[float, float] = (2.0, -1.0),
                     variance: str = "fixedlarge", num_terms: int | None = None,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                     device=None) -> dict[str, torch.Tensor]:
    """Terms of the DDPM bound per image in nats: {"prior": L_T, "kl": sum_{t=2}^T L_{t-1}, "decoder": L_0, "total"}."""
    images = check_uint8_images(images)
    if variance not in VARIANCES:
        raise UserError(f"unknown decoder variance {variance!r}; valid: {', '.join(VARIANCES)}")
    device = images.device if device is None else torch.device(device)
    sched = DDPMSchedule(sde, dtype=dtype, device=device)
    a, b = float(data_scale[0]), float(data_scale[1])
    x0 = a * images.to(device=device, dtype=dtype) / 255.0 + b  # Ho et al.: k/127.5 - 1 for a = 2
    batch = x0.shape[0]
    gen_device = generator.device if generator is not None else device

    def noise(shape):
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)

    def q_sample(t: torch.Tensor) -> torch.Tensor:  # x_t ~ q(x_t | x_0) (eq. 4)
        return broadcast_to(torch.sqrt(sched.abar[t]), x0) * x0 + broadcast_to(torch.sqrt(1 - sched.abar[t]), x0) * noise(x0.shape)

    def model_mean(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # eq. 11
        e = eps_fn(xt, t - 1)
        coef = sched.betas[t] / torch.sqrt(1 - sched.abar[t])
        return (xt - broadcast_to(coef, xt) * e) / broadcast_to(torch.sqrt(1 - sched.betas[t]), xt)

    def kl_term(t: torch.Tensor) -> torch.Tensor:  # L_{t-1} for t >= 2
        xt = q_sample(t)
        c0 = torch.sqrt(sched.abar_prev[t]) * sched.betas[t] / (1 - sched.abar[t])
        ct = torch.sqrt(1 - sched.betas[t]) * (1 - sched.abar_prev[t]) / (1 - sched.abar[t])
        post_mean = broadcast_to(c0, x0) * x0 + broadcast_to(ct, x0) * xt
        return gaussian_kl(post_mean, sched.posterior_var[t], model_mean(xt, t), sched.model_var(t, variance))

    with torch.no_grad():
        big_t = torch.full((batch,), sched.T, device=device)
        prior = gaussian_kl(broadcast_to(torch.sqrt(sched.abar[big_t]), x0) * x0, 1 - sched.abar[big_t],
                            torch.zeros_like(x0), torch.ones(batch, dtype=dtype, device=device))
        if num_terms is None:
            kl = sum(kl_term(torch.full((batch,), t, device=device)) for t in range(2, sched.T + 1))
        else:
            if int(num_terms) < 1:
                raise UserError(f"num_terms must be >= 1, got {num_terms}")
            draws = [kl_term(torch.randint(2, sched.T + 1, (batch,), generator=generator, device=gen_device).to(device))
                     for _ in range(int(num_terms))]
            kl = (sched.T - 1) * torch.stack(draws).mean(0)  # unbiased estimate of the sum over t = 2..T
        one = torch.ones(batch, dtype=torch.long, device=device)
        x1 = q_sample(one)
        decoder = discretized_gaussian_nll(x0, model_mean(x1, one), sched.model_var(one, variance),
                                           half_width=a / 510.0, low=b, high=a + b)
    return {"prior": prior, "kl": kl, "decoder": decoder, "total": prior + kl + decoder}


def ddpm_bound_bpd(sde: VPSDE, eps_fn: EpsFn, images, data_scale: tuple[float, float] = (2.0, -1.0),
                   **options) -> torch.Tensor:
    """The DDPM variational bound in bits/dim per image (Ho et al., 2020); options as `ddpm_bound_terms`."""
    terms = ddpm_bound_terms(sde, eps_fn, images, data_scale, **options)
    num_dims = terms["total"].new_tensor(check_uint8_images(images)[0].numel())
    return terms["total"] / (num_dims * math.log(2.0))

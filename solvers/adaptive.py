"""Adaptive-step reverse-SDE solver of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast", algorithm 1).

Each trial step from t to t - h shares one Gaussian draw z between
    x'  = x - h f_rev(x, t) + sqrt(h) g(t) z                    (Euler-Maruyama)
    x~  = x - h f_rev(x', t - h) + sqrt(h) g(t - h) z
    x'' = (x' + x~) / 2                                        (improved Euler)
(f_rev, g: the reverse-time drift and diffusion of `sde.reverse(score_fn)`). The mixed tolerance is
delta = max(atol, rtol * max(|x'|, |x'_prev|)) elementwise, the scaled error E = ||(x' - x'') / delta||_2 / sqrt(n)
(or the max norm), a step is accepted when E <= 1 (keeping the extrapolated x''), and the next step size is
h = min(t - eps, safety * h * E^(-r)).

Noise (a documented deviation): the paper draws a fresh z for every trial. Because acceptance depends on z,
that biases the injected noise when the error norm does not concentrate (low dimension): on the 2-D ring the
mean radius of the samples drifts from 2.01 to 2.05 (VP) / 2.14 (VE, rtol=0.01). The default noise="bridge"
keeps the Brownian path after a rejection: the shorter step's increment is drawn from the Brownian bridge
given the rejected one (Rackauckas & Nie 2017, without the memory of the leftover piece), which brings the
radius back to 2.02 / 2.05; noise="fresh" is the paper's algorithm.

Batching: every sample has its own t and h (the paper's per-sample controller); the batch advances together,
samples that reached eps take steps of size 0. Each iteration evaluates the score twice on the whole batch, so
nfe_used = 2 * iterations, rejected trials included. The only host synchronisation is one `any()` per
iteration to decide whether any sample is still running. `nfe`, when given, is a hard cap (default 10000): when
it leaves room for one trial only, that trial covers the remaining time and is accepted whatever its error
(less accurate, never over the cap; raise nfe or loosen rtol/atol when the used NFE equals the cap).
"""
from __future__ import annotations

import math

import torch

from errors import UserError
from solvers.common import check_choice, gaussian_like, initial_state
from solvers.registry import register
from solvers.timesteps import check_eps
from sde_lib import broadcast_to


@register("adaptive")
def adaptive_sampler(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, rtol: float = 0.05,
                     atol: float = 0.0078,
                     h_init: float = 0.01, safety: float = 0.9, r: float = 0.9, norm: str = "l2",
                     noise: str = "bridge", device=None, dtype=None):
    """Adaptive EM / improved-Euler reverse-SDE sampler; returns (samples, score evaluations used)."""
    eps = check_eps(sde, eps, "adaptive")
    check_choice(norm, ("l2", "linf"), "adaptive norm")
    check_choice(noise, ("bridge", "fresh"), "adaptive noise")
    if rtol < 0 or atol <= 0:
        raise UserError(f"adaptive: need rtol >= 0 and atol > 0, got rtol={rtol}, atol={atol}")
    if not 0 < safety <= 1 or not 0 < r <= 1 or not 0 < h_init:
        raise UserError(f"adaptive: need 0 < safety <= 1, 0 < r <= 1, h_init > 0; got {safety}, {r}, {h_init}")
    cap = 10000 if nfe is None else int(nfe)
    if cap < 2:
        raise UserError(f"adaptive: nfe (a cap here) must be at least 2, got {nfe}")
    rev = sde.reverse(score_fn)
    x = initial_state(sde, shape, x_T, generator, device, dtype)
    batch, dim = x.shape[0], x[0].numel()
    t = torch.full((batch,), float(sde.T), device=x.device, dtype=x.dtype)
    h = torch.full_like(t, min(h_init, sde.T - eps))
    x_prev, used = x, 0
    w = h.sqrt()[:, None] * gaussian_like(x, generator).reshape(batch, -1)  # Brownian increment of the trial
    while True:
        final = used + 4 > cap  # the cap leaves no room for a trial after this one: cover the rest now
        if final:  # extend the Brownian increment over the longer step: W(t - eps) = W(h) + sqrt(t - eps - h) z
            rest = (t - eps).clamp_min(0.0)
            w = w + ((rest - h).clamp_min(0.0)[:, None]).sqrt() * gaussian_like(x, generator).reshape(batch, -1)
            h = rest
        hb, t_next, wb = broadcast_to(h, x), t - h, w.reshape(x.shape)
        drift, diffusion = rev.sde(x, t)
        x_em = x - drift * hb + broadcast_to(diffusion, x) * wb
        drift2, diffusion2 = rev.sde(x_em, t_next)
        x_ie = 0.5 * (x_em + x - drift2 * hb + broadcast_to(diffusion2, x) * wb)
        used += 2
        delta = torch.maximum(torch.full_like(x, atol), rtol * torch.maximum(x_em.abs(), x_prev.abs()))
        scaled = ((x_em - x_ie) / delta).reshape(batch, -1)
        err = scaled.abs().amax(1) if norm == "linf" else scaled.norm(dim=1) / math.sqrt(dim)
        accept = ((err <= 1.0) | final) & (h > 0)
        mask = broadcast_to(accept, x)
        x = torch.where(mask, x_ie, x)
        x_prev = torch.where(mask, x_em, x_prev)
        finishing = accept & (h >= t - eps)  # the step was cut to land on eps exactly
        t = torch.where(finishing, torch.full_like(t, eps), torch.where(accept, t_next, t))
        # Controller: safety * h * E^(-r); E = 0 (a perfectly smooth step) lets h grow to what remains.
        h_old, h = h, torch.minimum(t - eps, safety * h * err.clamp_min(1e-12) ** (-r)).clamp_min(0.0)
        if not bool((t > eps).any()):  # the one host synchronisation per iteration
            return x, used
        w = _next_increment(w, h_old, h, accept, gaussian_like(x, generator).reshape(batch, -1), noise)


def _next_increment(w, h_old, h, accept, z, noise: str):
    """Brownian increment over the next trial step h: fresh after an accepted step (or always, noise="fresh");
    after a rejection with noise="bridge", W(h) drawn from the Brownian bridge given the rejected W(h_old):
    N(h / h_old W(h_old), h (h_old - h) / h_old) (h <= h_old on rejection)."""
    fresh = h.sqrt()[:, None] * z
    if noise == "fresh":
        return fresh
    frac = (h / h_old.clamp_min(torch.finfo(h.dtype).tiny))[:, None]
    bridged = frac * w + ((1.0 - frac).clamp_min(0.0) * h[:, None]).sqrt() * z
    return torch.where(accept[:, None], fresh, bridged)

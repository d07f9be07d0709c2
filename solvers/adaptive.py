"""Adaptive-step reverse-SDE solver of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast", algorithm 1).

Each trial step from t to t - h shares one Gaussian draw z between
    x'  = x - h f_rev(x, t) + sqrt(h) g(t) z                    (Euler-Maruyama)
    x~  = x - h f_rev(x', t - h) + sqrt(h) g(t - h) z
    x'' = (x' + x~) / 2                                        (improved Euler)
(f_rev, g: the reverse-time drift and diffusion of `sde.reverse(score_fn)`). The mixed tolerance is
delta = max(atol, rtol * max(|x'|, |x'_prev|)) elementwise, the scaled error E = ||(x' - x'') / delta||_2 / sqrt(n)
(or the max norm), a step is accepted when E <= 1 (keeping the extrapolated x''), and the next step size is
h = min(t - eps, safety * h * E^(-r)).

Noise: the paper draws a fresh z for every trial (noise="fresh"). Because acceptance depends on z, that
conditions the accepted increments on the rejections (large increments are rejected more often): on the 2-D
VE ring the mean radius drifts from 2.010 to 2.11-2.15 and does not come back as rtol falls. The default
noise="bridge" keeps one Brownian path per sample through every rejection (`solvers.brownian.BrownianMemory`,
Rackauckas & Nie 2017's rejection sampling with memory): a retried shorter step takes its increment from the
Brownian bridge to the rejected point, and that point stays on the path for the steps after it, so accepted
increments are exact Brownian increments and the bias falls with rtol (docs/SOLVERS.md has the numbers).

Batching: every sample has its own t and h (the paper's per-sample controller); the batch advances together,
samples that reached eps take steps of size 0. Each iteration evaluates the score twice on the whole batch, so
nfe_used = 2 * iterations, rejected trials included. The only host synchronisation is one `any()` per
iteration to decide whether any sample is still running. `nfe`, when given, is a hard cap (default 10000): a sample
whose next step could not reach eps within the trials the cap still affords takes the step (t - eps) / trials
instead and accepts it whatever its error, so the tail becomes a fixed-step improved-Euler run over the rest
(less accurate, never over the cap; raise nfe or loosen rtol/atol when the used NFE equals the cap).
"""
from __future__ import annotations

import math

import torch

from errors import UserError
from solvers.brownian import BrownianMemory
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
    memory = BrownianMemory(batch, dim, x, generator) if noise == "bridge" else None
    while True:
        # The cap affords `trials` more trials: a step shorter than (t - eps) / trials could not reach eps in
        # time, so such a step is lengthened to that floor and accepted (equal steps over what remains).
        trials = (cap - used) // 2
        floor = (t - eps).clamp_min(0.0) / trials
        forced = h <= floor
        h = torch.maximum(h, floor)
        # Brownian increment of the trial step: from the kept path, or fresh (the paper's algorithm).
        if memory is None:
            w = h.sqrt()[:, None] * gaussian_like(x, generator).reshape(batch, -1)
        else:
            w = memory.increment(h, h > 0)
        hb, t_next, wb = broadcast_to(h, x), t - h, w.reshape(x.shape)
        drift, diffusion = rev.sde(x, t)
        x_em = x - drift * hb + broadcast_to(diffusion, x) * wb
        drift2, diffusion2 = rev.sde(x_em, t_next)
        x_ie = 0.5 * (x_em + x - drift2 * hb + broadcast_to(diffusion2, x) * wb)
        used += 2
        delta = torch.maximum(torch.full_like(x, atol), rtol * torch.maximum(x_em.abs(), x_prev.abs()))
        scaled = ((x_em - x_ie) / delta).reshape(batch, -1)
        err = scaled.abs().amax(1) if norm == "linf" else scaled.norm(dim=1) / math.sqrt(dim)
        accept = ((err <= 1.0) | forced) & (h > 0)
        mask = broadcast_to(accept, x)
        x = torch.where(mask, x_ie, x)
        x_prev = torch.where(mask, x_em, x_prev)
        finishing = accept & (h >= t - eps)  # the step was cut to land on eps exactly
        t = torch.where(finishing, torch.full_like(t, eps), torch.where(accept, t_next, t))
        # Controller: safety * h * E^(-r); E = 0 (a perfectly smooth step) lets h grow to what remains.
        h = torch.minimum(t - eps, safety * h * err.clamp_min(1e-12) ** (-r)).clamp_min(0.0)
        broken = ~torch.isfinite(err).all()  # a NaN / inf score: no step is ever accepted (once: an endless loop)
        if memory is None:
            running, bad = torch.stack([(t > eps).any(), broken]).tolist()  # the one host synchronisation
        else:
            memory.advance(accept)
            running, width, bad = torch.stack([(t > eps).any().long(), memory.stored(),
                                               broken.long()]).tolist()  # one sync
            memory.trim(width)
        if bad:
            raise UserError(f"adaptive: the score returned NaN or inf values (after {used} score evaluations); "
                            "the step size cannot be controlled")
        if not running:
            return x, used
        if used >= cap:  # the forced steps keep the cap; this only guards against a stalled controller
            raise UserError(f"adaptive: nfe={cap} score evaluations spent before reaching eps")

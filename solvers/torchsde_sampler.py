"""Reverse-time SDE (Song et al., 2021, eq. 6) integrated with torchsde.sdeint on a fixed step.

torchsde integrates forwards in time, so the reverse SDE is written in s = T - t: y(s) = x(T - s) solves
dy = -[f(y, T-s) - g(T-s)^2 score(y, T-s)] ds + g(T-s) dW_s. The noise is diagonal (g is a per-sample scalar
times the identity, independent of x), so the Ito and Stratonovich forms coincide (the correction
g dg/dx / 2 vanishes): Ito methods (euler, milstein, srk) and Stratonovich methods (euler_heun, heun,
midpoint, reversible_heun) all solve the same equation.
"""
from __future__ import annotations

import torch
import torchsde

from sde_lib import SDE, batch_time, broadcast_to
from solvers.common import CountingScore, check_budget, check_choice, initial_state, steps_for_budget
from solvers.registry import register

# method -> (torchsde sde_type, score evaluations per step, extra evaluations once per solve besides the
# one drift call torchsde's shape check makes)
TORCHSDE_METHODS = {
    "euler": ("ito", 1, 0),
    "milstein": ("ito", 1, 0),
    "srk": ("ito", 10, 0),  # SRID2 re-evaluates the drift of earlier stages: 1 + 2 + 3 + 4 per step
    "euler_heun": ("stratonovich", 1, 0),
    "heun": ("stratonovich", 2, 0),
    "midpoint": ("stratonovich", 2, 0),
    "reversible_heun": ("stratonovich", 1, 1),
}


class _ReverseTimeSDE(torch.nn.Module):
    """The reverse SDE in forward time s = T - t on flattened (batch, dim) states, diagonal noise."""

    noise_type = "diagonal"

    def __init__(self, sde: SDE, score_fn, shape, sde_type: str):
        super().__init__()
        self.sde_type = sde_type
        self.forward_sde = sde
        self.reverse = sde.reverse(score_fn)
        self.shape = tuple(shape)

    def f(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = y.reshape(self.shape)
        drift, _ = self.reverse.sde(x, batch_time(self.forward_sde.T - s, x))
        return -drift.reshape(y.shape)

    def g(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = batch_time(self.forward_sde.T - s, y)
        _, diffusion = self.forward_sde.sde(y, t)  # g(t) depends on t only; no score needed
        return broadcast_to(diffusion, y).expand_as(y)


@register("sde_torchsde")
def torchsde_sample(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, method: str = "euler",
                    device=None, dtype=None):
    """Reverse SDE from T to eps with torchsde's fixed-step `method`; returns (samples, nfe_used)."""
    check_choice(method, TORCHSDE_METHODS, "torchsde method")
    sde_type, cost, fixed = TORCHSDE_METHODS[method]
    fixed += 1  # sdeint evaluates the drift once to check shapes
    n = steps_for_budget(check_budget(nfe, sde.N * cost + fixed, f"sde_torchsde ({method})"), cost, fixed,
                         f"sde_torchsde ({method})")
    x = initial_state(sde, shape, x_T, generator, device, dtype)
    counter = CountingScore(score_fn)
    model = _ReverseTimeSDE(sde, counter, x.shape, sde_type)
    y0 = x.reshape(x.shape[0], -1)
    span = sde.T - eps
    # One integer seed from the generator makes the Brownian motion reproducible (one host read, before solving).
    entropy = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator,
                                device=generator.device if generator is not None else "cpu"))
    levy = "space-time" if method == "srk" else "none"
    bm = torchsde.BrownianInterval(t0=0.0, t1=span, size=y0.shape, dtype=y0.dtype, device=y0.device,
                                   entropy=entropy, levy_area_approximation=levy)
    # float64 times, and a step a hair longer than span / n, so that exactly n steps reach the end
    # (torchsde clamps the last step; float32 time accumulation would add a sliver of a step).
    ts = torch.tensor([0.0, span], dtype=torch.float64, device=y0.device)
    ys = torchsde.sdeint(model, y0, ts, bm=bm, method=method, dt=span / n * (1 + 1e-9))
    return ys[-1].reshape(x.shape), counter.calls


def _method_sampler(method: str):
    def sampler(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, device=None, dtype=None):
        return torchsde_sample(sde, score_fn, shape, nfe=nfe, eps=eps, x_T=x_T, generator=generator,
                               method=method, device=device, dtype=dtype)
    sampler.__doc__ = f"Reverse SDE with torchsde's fixed-step {method!r}."
    return sampler


for _method in ("srk",):  # reversible_heun stays a `method` option: unstable on these dissipative targets
    register(f"sde_{_method}")(_method_sampler(_method))

"""Probability-flow ODE dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 (Song et al., 2021, eq. 13).

Solved with torchdiffeq (adaptive dopri5 & co with rtol/atol, fixed-step euler/midpoint/rk4 on n steps) or
with scipy.integrate.solve_ivp (RK45, the paper's reference setting rtol = atol = 1e-5). The ODE runs
backwards to sample or decode latents and forwards to encode data; the two directions invert each other.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import integrate
from torchdiffeq import odeint

from errors import UserError
from sde_lib import SDE, batch_time
from solvers.common import (CountingScore, ShapeCheckedScore, check_budget, check_choice, check_nfe, check_state_tensor,
                            initial_state, steps_for_budget)
from solvers.registry import register
from solvers.timesteps import check_eps

# score evaluations per step of torchdiffeq's fixed-grid methods
FIXED_STEP_COST = {"euler": 1, "midpoint": 2, "rk4": 4}
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
SCIPY_METHODS = ("RK45", "RK23", "DOP853")  # explicit: every function call is one score evaluation


class CappedScore(CountingScore):
    """Counts score evaluations and stops an adaptive solve that would exceed `cap` (None: no cap)."""

    def __init__(self, score_fn, cap: int | None, method: str, rtol: float, atol: float, solver: str = "ode"):
        super().__init__(score_fn)
        self.cap = None if cap is None else check_budget(cap, 1, f"{solver} ({method})")
        self.method, self.rtol, self.atol, self.solver = method, rtol, atol, solver

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cap is not None and self.calls >= self.cap:
            other = (", or use a fixed-step sampling.method (euler, midpoint, rk4)" if self.method in ADAPTIVE_METHODS
                     else f", or another sampling.method ({', '.join(SCIPY_METHODS)})" if self.method in SCIPY_METHODS
                     else "")
            raise UserError(f"{self.solver} ({self.method}): more than nfe={self.cap} score evaluations needed at "
                            f"rtol={self.rtol:g}, atol={self.atol:g}; raise nfe (--nfe, config sampling.nfe), loosen "
                            "sampling.rtol / sampling.atol" + other)
        return super().__call__(x, t)


def pf_ode_drift(sde: SDE, score_fn):
    """The PF-ODE's velocity field v(t, x) = f - g^2 score / 2, as torchdiffeq's func(t, x)."""
    flow = sde.reverse(score_fn, probability_flow=True)

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return flow.sde(x, batch_time(t, x))[0]
    return velocity


def solve_pf_ode(sde: SDE, score_fn, x: torch.Tensor, t_start: float, t_end: float, *, method: str = "dopri5",
                 rtol: float = 1e-5, atol: float = 1e-5, nfe: int | None = None) -> tuple[torch.Tensor, int]:
    """Integrate the PF-ODE from t_start to t_end with torchdiffeq; returns (x(t_end), score evaluations).

    Fixed-step methods take n = nfe // cost steps (default n = sde.N); adaptive ones use rtol/atol, and `nfe`,
    when given, caps their score evaluations (a UserError when the tolerance needs more).
    """
    check_choice(method, tuple(FIXED_STEP_COST) + ADAPTIVE_METHODS, "ODE method")
    if not (rtol > 0 and atol > 0):
        raise UserError(f"ode ({method}): rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    counter = CappedScore(score_fn, None if method in FIXED_STEP_COST else nfe, method, rtol, atol)
    velocity = pf_ode_drift(sde, counter)
    # Integrate in tau = |t - t_start| (forward for torchdiffeq in both directions) and make adaptive methods
    # land exactly on the end (`step_t`): their stages then never leave [eps, T], where the SDE is defined.
    # torchdiffeq's initial-step probe at tau = h0 can (Hairer's heuristic, slow fields): it is clamped to the end.
    sign = 1.0 if t_end >= t_start else -1.0
    length = abs(t_end - t_start)

    def func(tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sign * velocity(t_start + sign * tau.clamp(0.0, length), y)

    if method in FIXED_STEP_COST:
        cost = FIXED_STEP_COST[method]
        n = steps_for_budget(check_budget(nfe, sde.N * cost, f"ode ({method})"), cost, 0, f"ode ({method})")
        taus = torch.linspace(0.0, length, n + 1, device=x.device, dtype=torch.float64)
        solution = odeint(func, x, taus, method=method)
    else:
        taus = torch.tensor([0.0, length], device=x.device, dtype=torch.float64)
        try:
            solution = odeint(func, x, taus, method=method, rtol=rtol, atol=atol, options={"step_t": taus[1:]})
        except AssertionError as error:  # torchdiffeq's step-size underflow: a NaN / inf field, or far too stiff
            raise UserError(f"ode ({method}): the step size underflowed after {counter.calls} score evaluations "
                            f"({error}); the score returned NaN/inf values, or rtol/atol are too tight") from None
    return solution[-1], counter.calls


def _checked_options(name: str, options: dict) -> dict:
    valid = ("method", "rtol", "atol", "nfe")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"{name} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(valid)}")
    check_nfe(options.get("nfe"))
    return options


@torch.no_grad()
def encode(sde: SDE, score_fn, x: torch.Tensor, eps: float = 1e-3, **solver_options) -> tuple[torch.Tensor, int]:
    """Map data x (at t = eps) to latents at t = T along the PF-ODE; returns (z, nfe_used)."""
    check_state_tensor(x, "encode: x")
    eps = check_eps(sde, eps, "encode")
    return solve_pf_ode(sde, ShapeCheckedScore(score_fn), x, eps, sde.T, **_checked_options("encode", solver_options))


@torch.no_grad()
def decode(sde: SDE, score_fn, z: torch.Tensor, eps: float = 1e-3, **solver_options) -> tuple[torch.Tensor, int]:
    """Map latents z (at t = T) back to data at t = eps along the PF-ODE; returns (x, nfe_used)."""
    check_state_tensor(z, "decode: z")
    eps = check_eps(sde, eps, "decode")
    return solve_pf_ode(sde, ShapeCheckedScore(score_fn), z, sde.T, eps, **_checked_options("decode", solver_options))


@register("ode")
def ode_sample(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, method: str = "dopri5",
               rtol: float = 1e-5, atol: float = 1e-5, device=None, dtype=None):
    """PF-ODE sampler through torchdiffeq (decode prior noise); returns (samples, nfe_used)."""
    check_choice(method, tuple(FIXED_STEP_COST) + ADAPTIVE_METHODS, "ODE method")
    x = initial_state(sde, shape, x_T, generator, device, dtype)
    return decode(sde, score_fn, x, eps, method=method, rtol=rtol, atol=atol, nfe=nfe)


def _fixed_ode(method: str):
    def sampler(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, device=None, dtype=None):
        return ode_sample(sde, score_fn, shape, nfe=nfe, eps=eps, x_T=x_T, generator=generator, method=method,
                          device=device, dtype=dtype)
    sampler.__doc__ = f"PF-ODE with torchdiffeq's fixed-step {method!r} ({FIXED_STEP_COST[method]} NFE per step)."
    return sampler


for _method in FIXED_STEP_COST:
    register(f"ode_{_method}")(_fixed_ode(_method))


@register("ode_scipy")
def ode_scipy_sample(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, method: str = "RK45",
                     rtol: float = 1e-5, atol: float = 1e-5, device=None, dtype=None):
    """PF-ODE through scipy.integrate.solve_ivp (RK45, rtol = atol = 1e-5 as in the paper); `nfe` caps its evaluations.

    The state crosses to the host at every evaluation (scipy works on NumPy arrays); returns (samples, nfe_used).
    """
    check_choice(method, SCIPY_METHODS, "scipy ODE method")
    x = initial_state(sde, shape, x_T, generator, device, dtype)
    counter = CappedScore(score_fn, nfe, method, rtol, atol, solver="ode_scipy")
    velocity = pf_ode_drift(sde, counter)

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        state = torch.from_numpy(y).to(device=x.device, dtype=x.dtype).reshape(x.shape)
        time = torch.tensor(t, device=x.device, dtype=x.dtype)
        out = velocity(time, state).reshape(-1).double().cpu().numpy()
        if not np.isfinite(out).all():  # on the host already: no extra synchronisation
            raise UserError(f"ode_scipy ({method}): the score returned NaN or inf values at t = {t:.4g}")
        return out

    y0 = x.reshape(-1).double().cpu().numpy()
    result = integrate.solve_ivp(fun, (sde.T, eps), y0, method=method, rtol=rtol, atol=atol)
    if not result.success:
        raise RuntimeError(f"solve_ivp failed: {result.message}")
    out = torch.from_numpy(result.y[:, -1]).to(device=x.device, dtype=x.dtype).reshape(x.shape)
    return out, counter.calls

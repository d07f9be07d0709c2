"""Exact log-likelihood through the probability-flow ODE (Song et al., 2021, Sec. 4.3 and App. D.2).

The PF-ODE dx/dt = f~(x, t) = f(x, t) - g(t)^2 s(x, t) / 2 (eq. 13) maps x(eps) to z = x(T). The
instantaneous change of variables (Chen et al., 2018) gives d log p_t(x(t)) / dt = -div f~(x(t), t), so

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt        (App. D.2, eq. 39)

We integrate the joint state (x, delta) with d delta/dt = div f~ from eps to T on the whole batch at
once and add the prior log-density of the end point. Two integrators:

* torchdiffeq (`method` = any torchdiffeq method, default "dopri5"): the state stays on the device of x
  for the whole integration; the batch shares one adaptive step size (error norm over the whole batch).
  The only host synchronization is torchdiffeq's scalar accept/reject decision per step.
* `method="scipy_rk45"`: the reference setting of Song et al., scipy's RK45 on the flattened batch,
  every evaluation moving the state through numpy on the host.

NFE counts calls of `score_fn` (= forward passes of the network). Every call also costs backward
passes for the divergence, which NFE does not count: one VJP per probe for Hutchinson-Skilling
(`n_probes`), 3 n_probes for Hutch++ (sketch size n_probes), one per data dimension for the exact divergence.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torchdiffeq

from errors import UserError
from likelihood.time_change import TimeChange, check_state, scaled_state_field
from likelihood.divergence import (DIVERGENCES, HUTCHPP, draw_probes, exact_divergence, hutchinson_divergence,
                                   hutchpp_divergence)
from sde_lib.base import SDE, ScoreFn
from solvers.common import CountingScore, ShapeCheckedScore  # the NFE counter and output check the samplers use
from solvers.ode import ADAPTIVE_METHODS  # torchdiffeq's error-controlled methods, the samplers' list

SCIPY_METHOD = "scipy_rk45"


def torchdiffeq_methods() -> list[str]:
    """Integrators accepted by `log_likelihood(method=...)`."""
    from torchdiffeq._impl.odeint import SOLVERS

    return sorted(m for m in SOLVERS if m != "scipy_solver") + [SCIPY_METHOD]


def fixed_grid_methods() -> list[str]:
    """torchdiffeq's fixed-step integrators: they need options={"step_size": h} (or a grid_constructor)."""
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.solvers import FixedGridODESolver

    return sorted(m for m, solver in SOLVERS.items() if issubclass(solver, FixedGridODESolver))


def step_free_methods() -> list[str]:
    """Integrators `log_likelihood` runs without torchdiffeq options (adaptive ones and scipy_rk45): the CLI's choice."""
    return [m for m in torchdiffeq_methods() if m not in fixed_grid_methods()]


def _check_inputs(sde: SDE, x: torch.Tensor, eps: float, method: str, rtol: float, atol: float,
                  divergence: str, n_probes: int, options: dict | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise UserError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise UserError(f"x must be a floating-point tensor (float32/float64), got {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise UserError(f"x must have shape (batch, ...) with batch >= 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise UserError("x contains NaN or infinite values")
    if not 0.0 < eps < sde.T:
        raise UserError(f"eps must lie in (0, T={sde.T}), got {eps}")
    if method not in torchdiffeq_methods():
        raise UserError(f"unknown ODE method {method!r}; valid: {', '.join(torchdiffeq_methods())}")
    step = (options or {}).get("step_size")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < math.inf):
        raise UserError(f"options['step_size'] must be a positive number, got {step!r}")
    if method in fixed_grid_methods() and not {"step_size", "grid_constructor"} & set(options or {}):
        # torchdiffeq's grid would be [eps, T] alone: one step over the whole interval, a meaningless number.
        raise UserError(f"ODE method {method!r} takes fixed steps: give options={{'step_size': h}} (or a "
                        f"grid_constructor), or use an adaptive method ({', '.join(step_free_methods())})")
    if not (rtol > 0 and atol > 0):
        raise UserError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    if divergence not in DIVERGENCES:
        raise UserError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if int(n_probes) < 1:
        raise UserError(f"n_probes must be >= 1, got {n_probes}")


def _drift_and_divergence(sde: SDE, score: CountingScore, divergence: str, probes: torch.Tensor | None):
    """f(x, t) -> (PF-ODE drift, its divergence per sample), both detached.

    Hutch++ ("hutchpp", "hutchpp_plain") gets probes = [S; G] and estimates the same divergence with 3 n_probes VJPs.
    Both Hutchinson-Skilling probes estimate the divergence of the whole drift f - g^2 s / 2. Estimating only the
    score part and adding div f = -beta D / 2 in closed form (VP) was measured worse for Gaussian probes (mix64,
    VP: 1.5 instead of 0.2 bits/dim per image): the linear drift cancels most of the score's Jacobian, which the
    cross term 4 c tr(A) of Var[e^T (c I + A) e] = 2 ||c I + A||_F^2 accounts for; for Rademacher probes
    e^T c I e = c D exactly, so the split would change nothing.
    """

    def differentiable_score(y: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        out = score(y, tt)
        if not out.requires_grad:  # its divergence would be taken as 0: a silently wrong log-likelihood
            raise UserError("score_fn returned a tensor without an autograd graph (made under torch.no_grad(), "
                            "detached, or through numpy); log_likelihood differentiates it for the divergence")
        return out

    reverse = sde.reverse(differentiable_score, probability_flow=True)

    def fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            drift = reverse.sde(x, t)[0]  # eq. 13 in forward time: f - g^2 s / 2
            if divergence == "exact":
                div = exact_divergence(drift, x)
            elif divergence in HUTCHPP:
                div = hutchpp_divergence(drift, x, probes, diagonal=divergence == "hutchpp")
            else:
                div = hutchinson_divergence(drift, x, probes)
        return drift.detach(), div.detach()

    return fn


def _in_variable(fn, change: TimeChange):
    """(x, s) -> (dx/ds, d delta/ds) = (f~, div f~) dt/ds at t = t(s): both integrals change variables alike."""

    def fn_s(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt_ds = change.dt_ds(s)
        drift, div = fn(x, change.t_of_s(s))
        return drift * dt_ds, div * dt_ds

    return fn_s


@torch.no_grad()  # the divergence's VJP is enabled locally in `fn`, nothing else keeps a graph
def log_likelihood(sde: SDE, score_fn: ScoreFn, x: torch.Tensor, eps: float = 1e-5, method: str = "dopri5",
                   rtol: float = 1e-5, atol: float = 1e-5, divergence: str = "hutchinson_rademacher",
                   n_probes: int = 1, generator: torch.Generator | None = None,
                   prior_logp: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   options: dict | None = None, time_variable: str = "t",
                   state: str = "x", error_norm: str = "per_dim") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-sample log p_eps(x) through the PF-ODE; returns (logp (batch,), z = x(T), nfe).

    `time_variable` = "t" integrates in t, "log_sigma" in s = log(sigma(t) / alpha(t)), "sigma" in u = sigma / alpha;
    `state` = "x" integrates x, "x_over_alpha" the semi-linear state x / alpha(t) (likelihood.time_change; all
    measured no cheaper than t and x on the mixtures and a trained network, see docs/PERFORMANCE.md).
    `divergence`: "exact", "hutchinson_rademacher" / "hutchinson_gaussian" (`n_probes` VJPs per evaluation) or
    "hutchpp" / "hutchpp_plain" (Hutch++ with sketch size k = `n_probes`: 3k VJPs; likelihood.divergence).
    `prior_logp(z)` replaces `sde.prior_logp` at T (e.g. the exact marginal p_T in tests); `generator`
    draws the Hutchinson probes (and Hutch++ sketches), fixed for the whole integration; `options` go to
    torchdiffeq.odeint (e.g. {"step_size": 0.01} for fixed-step methods).
    `error_norm` (adaptive torchdiffeq methods; an `options["norm"]` takes precedence): "per_dim" holds
    log p to the tolerance per data dimension (`per_dim_norm`), "max_rms" is torchdiffeq's norm for the
    state (x, delta), "joint_rms" scipy's (`joint_rms_norm`); scipy_rk45 always uses scipy's.
    """
    _check_inputs(sde, x, eps, method, rtol, atol, divergence, n_probes, options)
    if torch.is_inference_mode_enabled():
        raise UserError("log_likelihood needs autograd for the divergence: call it outside torch.inference_mode() "
                        "(torch.no_grad() is fine)")
    options = _with_norm(options, method, error_norm, x[0].numel())
    prior_logp = sde.prior_logp if prior_logp is None else prior_logp
    score = CountingScore(ShapeCheckedScore(score_fn))
    probes = draw_probes(x, divergence, int(n_probes), generator)
    fn = _drift_and_divergence(sde, score, divergence, probes)
    change = TimeChange(sde, time_variable)
    check_state(sde, state)
    if state != "x":
        fn = scaled_state_field(fn, sde)
    if time_variable != "t":
        fn = _in_variable(fn, change)
    start, end = (float(change.s_of_t(torch.tensor(v, dtype=torch.float64))) for v in (eps, sde.T))
    x0 = x / sde.mean_coeff(torch.tensor(eps, dtype=x.dtype, device=x.device)) if state != "x" else x
    if method == SCIPY_METHOD:
        z, delta = _integrate_scipy(fn, x0, start, end, rtol, atol)
    else:
        z, delta = _integrate_torchdiffeq(fn, x0, start, end, method, rtol, atol, options)
    if state != "x":
        z = z * sde.mean_coeff(torch.tensor(sde.T, dtype=x.dtype, device=x.device))
    logp = prior_logp(z) + delta  # App. D.2, eq. 39
    return logp, z, score.calls


def per_dim_norm(num_dims: int):
    """Error norm that controls log p per data dimension: max(RMS of the x error, RMS of the delta error / D).

    The inputs are torchdiffeq's scaled errors, error / (atol + rtol |y|). Dividing delta's by D makes its
    tolerance D (atol + rtol |delta|) nats, i.e. atol + rtol |delta| nats per dimension: the scale of bits/dim
    and of the per-component tolerance on x. torchdiffeq's own norm (`max_rms_norm`) holds the whole
    log-likelihood to atol nats, D times tighter than its per-dimension error, and spends its steps there.
    """

    def norm(state) -> torch.Tensor:
        x_error, delta_error = state
        return torch.maximum(x_error.pow(2).mean().sqrt(), delta_error.pow(2).mean().sqrt() / num_dims)

    return norm


ERROR_NORMS = ("per_dim", "max_rms", "joint_rms")


def joint_rms_norm(state) -> torch.Tensor:
    """scipy's error norm, RMS over the whole state (x and delta together): error_norm="joint_rms".

    torchdiffeq's default for the tuple state (x, delta) is the max of the two RMS norms, which controls the
    error of the log-likelihood term on its own and takes somewhat more steps.
    """
    parts = state if isinstance(state, (tuple, list)) else (state,)
    flat = torch.cat([part.reshape(-1) for part in parts])
    return flat.pow(2).mean().sqrt()


def max_rms_norm(state) -> torch.Tensor:
    """torchdiffeq's own norm for a tuple state: the largest of the RMS norms of x and of delta."""
    parts = state if isinstance(state, (tuple, list)) else (state,)
    return torch.stack([part.pow(2).mean().sqrt() for part in parts]).max()


def _with_norm(options: dict | None, method: str, error_norm: str, num_dims: int) -> dict | None:
    """torchdiffeq options with the error norm of `error_norm` added (adaptive methods only)."""
    if error_norm not in ERROR_NORMS:
        raise UserError(f"unknown error_norm {error_norm!r}; valid: {', '.join(ERROR_NORMS)}")
    if method not in ADAPTIVE_METHODS or (options and "norm" in options):
        return options
    norm = {"per_dim": per_dim_norm(num_dims), "max_rms": max_rms_norm, "joint_rms": joint_rms_norm}[error_norm]
    return {**(options or {}), "norm": norm}


def _integrate_torchdiffeq(fn, x, start, end, method, rtol, atol, options):
    """Joint (x, delta) integration from start to end with torchdiffeq, state kept on x's device.

    The score is only ever evaluated in [start, end]: adaptive steps land exactly on `end` (`step_t`) instead of
    overshooting it and interpolating back, and torchdiffeq's initial-step probe at start + h0 (Hairer's
    heuristic, which can reach far past `end` when the field starts slow) is clamped to `end`. A network is
    only trained on [eps, T]; VE's sigma(t) overflows float32 beyond it.
    """

    def ode(t, state):
        return fn(state[0], t.clamp(start, end))

    if method in ADAPTIVE_METHODS and not {"step_t", "jump_t"} & set(options or {}):
        options = {**(options or {}), "step_t": torch.tensor([end], dtype=torch.float64)}

    state0 = (x.detach(), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    times = torch.tensor([start, end], dtype=x.dtype, device=x.device)
    try:
        xs, deltas = torchdiffeq.odeint(ode, state0, times, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as error:  # torchdiffeq's step-size underflow: a NaN / inf field, or far too stiff
        raise UserError(f"log_likelihood ({method}): the step size underflowed ({error}); the score returned NaN/inf "
                        "values, or rtol/atol are too tight") from None
    return xs[-1], deltas[-1]


def _integrate_scipy(fn, x, start, end, rtol, atol):
    """Reference path: scipy RK45 on the flattened batch [x.ravel(), delta] through numpy each step."""
    from scipy.integrate import solve_ivp

    shape, batch = x.shape, x.shape[0]

    def ode(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y[:-batch]).reshape(shape).to(device=x.device, dtype=x.dtype)
        drift, div = fn(xt, torch.tensor(t, dtype=x.dtype, device=x.device))
        return np.concatenate([drift.cpu().numpy().reshape(-1), div.cpu().numpy()]).astype(np.float64)

    y0 = np.concatenate([x.detach().cpu().numpy().reshape(-1), np.zeros(batch)]).astype(np.float64)
    sol = solve_ivp(ode, (start, end), y0, rtol=rtol, atol=atol, method="RK45")
    if not sol.success:
        raise RuntimeError(f"scipy RK45 failed: {sol.message}")
    end = torch.from_numpy(sol.y[:, -1]).to(device=x.device, dtype=x.dtype)
    return end[:-batch].reshape(shape), end[-batch:]


def nats_per_dim(logp: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Negative log-likelihood per dimension, in nats."""
    return -logp / num_dims


def nats_to_bits(nats: torch.Tensor | float) -> torch.Tensor | float:
    """Convert nats to bits (divide by log 2)."""
    return nats / math.log(2.0)

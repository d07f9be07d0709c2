"""Integration variables for the PF-ODE: t itself, s = log(sigma(t) / alpha(t)) (minus half the log-SNR), or
u = sigma(t) / alpha(t) = e^s (EDM's time variable; with the state x / alpha the PF-ODE is dy/du = eps_hat).

The PF-ODE dx/dt = f~(x, t) and the divergence integral d delta/dt = div f~ become, for t = t(s),
dx/ds = f~(x, t(s)) dt/ds and d delta/ds = div f~(x, t(s)) dt/ds (change of variables in both integrals).
In s the field is smooth near the data end, where in t the VP noise level grows like sqrt(t) and the drift
changes fastest (cf. DPM-Solver, Lu et al., 2022, Sec. 3.1, and EDM's sigma parameterisation, Karras et al., 2022).

Closed forms, with B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2:
  VP:     sigma / alpha = sqrt(e^B - 1),      B(s) = log(1 + e^{2s}),      dB/ds = 2 e^{2s} / (1 + e^{2s})
  sub-VP: sigma / alpha = 2 sinh(B / 2),      B(s) = 2 asinh(e^s / 2),     dB/ds = e^s / sqrt(1 + e^{2s} / 4)
  VE:     sigma / alpha = sigma_min (sigma_max / sigma_min)^t: s is affine in t, dt/ds = 1 / log(sigma_max / sigma_min)
  EDM:    sigma / alpha = t: s = log t, dt/ds = e^s
and t(B) is the positive root of the quadratic B(t), dt/dB = 1 / beta(t).
"""
from __future__ import annotations

import math

import torch

from errors import UserError
from sde_lib import EDMSDE, VESDE, VPSDE, subVPSDE
from sde_lib.base import SDE

TIME_VARIABLES = ("t", "log_sigma", "sigma")


class TimeChange:
    """t <-> s maps of one SDE: `s_of_t(t)`, `t_of_s(s)` and `dt_ds(s)` on tensors (float t and s)."""

    def __init__(self, sde: SDE, variable: str):
        if variable not in TIME_VARIABLES:
            raise UserError(f"unknown time_variable {variable!r}; valid: {', '.join(TIME_VARIABLES)}")
        if variable != "t" and not isinstance(sde, (VPSDE, VESDE, EDMSDE)):
            raise UserError(f"time_variable {variable!r} needs a VP, sub-VP, VE or EDM SDE, got {type(sde).__name__}")
        self.sde, self.variable = sde, variable

    def _t_of_b(self, b: torch.Tensor) -> torch.Tensor:
        # beta_min t + (beta_max - beta_min) t^2 / 2 = B, positive root (written to avoid cancellation)
        b0, db = self.sde.beta_min, self.sde.beta_max - self.sde.beta_min
        return 2 * b / (b0 + torch.sqrt(b0 ** 2 + 2 * db * b))

    def s_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """The integration variable at time t."""
        if self.variable == "t":
            return t
        if self.variable == "sigma":  # u = sigma / alpha = e^s (EDM's time variable, Karras et al. 2022)
            return torch.exp(self._log_sigma(t))
        return self._log_sigma(t)

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(self.sde, VESDE):
            return torch.log(self.sde.sigma(t))
        if isinstance(self.sde, EDMSDE):
            return torch.log(t)
        b = self.sde.integrated_beta(t)
        if isinstance(self.sde, subVPSDE):
            return torch.log(2 * torch.sinh(b / 2))
        return 0.5 * torch.log(torch.expm1(b))

    def t_of_s(self, s: torch.Tensor) -> torch.Tensor:
        """The time t at integration variable s."""
        if self.variable == "t":
            return s
        if self.variable == "sigma":
            return self._t_of_log_sigma(torch.log(s))
        return self._t_of_log_sigma(s)

    def _t_of_log_sigma(self, s: torch.Tensor) -> torch.Tensor:
        if isinstance(self.sde, VESDE):
            return (s - math.log(self.sde.sigma_min)) / self.sde.log_ratio
        if isinstance(self.sde, EDMSDE):
            return torch.exp(s)
        if isinstance(self.sde, subVPSDE):
            return self._t_of_b(2 * torch.asinh(torch.exp(s) / 2))
        return self._t_of_b(torch.nn.functional.softplus(2 * s))  # log(1 + e^{2s})

    def dt_ds(self, s: torch.Tensor) -> torch.Tensor:
        """dt/ds at integration variable s."""
        if self.variable == "t":
            return torch.ones_like(s)
        if self.variable == "sigma":  # dt/du = (dt/d log u) / u
            return self._dt_dlog_sigma(torch.log(s)) / s
        return self._dt_dlog_sigma(s)

    def _dt_dlog_sigma(self, s: torch.Tensor) -> torch.Tensor:
        if isinstance(self.sde, VESDE):
            return torch.full_like(s, 1.0 / self.sde.log_ratio)
        if isinstance(self.sde, EDMSDE):
            return torch.exp(s)
        if isinstance(self.sde, subVPSDE):
            db_ds = torch.exp(s) / torch.sqrt(1 + torch.exp(2 * s) / 4)
        else:
            db_ds = 2 * torch.sigmoid(2 * s)
        return db_ds / self.sde.beta(self._t_of_log_sigma(s))


STATES = ("x", "x_over_alpha")


def check_state(sde: SDE, state: str) -> None:
    """Validate the `state` option of log_likelihood for this SDE (one-line UserError)."""
    if state not in STATES:
        raise UserError(f"unknown state {state!r}; valid: {', '.join(STATES)}")
    if state != "x" and not isinstance(sde, (VPSDE, VESDE, EDMSDE)):
        raise UserError(f"state {state!r} needs a VP, sub-VP, VE or EDM SDE, got {type(sde).__name__}")


def scaled_state_field(fn, sde: SDE):
    """(y, t) -> (dy/dt, d delta/dt) for the semi-linear state y = x / alpha(t) (DPM-Solver, Lu et al., 2022, eq. 3.1).

    The SDE's drift is linear, f = (alpha'/alpha) x, so dy/dt = (f~ - f)(alpha y, t) / alpha: only the score
    part -g^2 s / 2 is left, the linear part is exact. The divergence integrand is unchanged (the same div_x f~).
    """

    def fn_y(y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = sde.mean_coeff(t.to(y.dtype))
        x = alpha * y
        drift, div = fn(x, t)
        linear = sde.sde(x, t)[0]
        return (drift - linear) / alpha, div

    return fn_y

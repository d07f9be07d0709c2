"""How few score evaluations the PF-ODE likelihood needs when its step grid is known in advance (issue 15).

For each MIXTURE:SDE (exact score, exact divergence, the prior at T replaced by the exact p_T, float64):

1. a pilot pass of adaptive dopri5 (rtol = atol = TOL, the per-dimension norm) on batch A records its accepted
   steps (torchdiffeq's `callback_accept_step`);
2. that grid, resampled to N steps (linear interpolation in the step index, so its shape is kept), drives
   torchdiffeq's fixed-grid `rk4` (3/8 rule, 4 score evaluations per step) on batch A and on a second batch B
   drawn from the same mixture with another seed.

The ODE error, mean |log p - log p_eps exact| / (D log 2) bits/dim, is printed as a Markdown table next to the
adaptive default of `log_likelihood` on both batches. A tight pilot's grid shows the floor of what a step-size
controller could reach at N steps; batch B shows whether such a grid carries over to other samples.

Example (docs/PERFORMANCE.md):
  python scripts/likelihood_grid_floor.py --problems ring2d:vp,mix64:vp,ring2d:ve,mix64:subvp \
      --pilot_tols 1e-8,1e-6,1e-5 --nfe 48,60,72
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch
import torchdiffeq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import toy_mixture  # noqa: E402
from likelihood import log_likelihood  # noqa: E402
from likelihood.ode import _drift_and_divergence, per_dim_norm  # noqa: E402
from scripts.arg_types import csv_of, positive_int  # noqa: E402
from sde_lib import VESDE, VPSDE, subVPSDE  # noqa: E402
from solvers.common import CountingScore  # noqa: E402

SDES = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE}
EPS = 1e-5
RK4_EVALS_PER_STEP = 4


class _Field:
    """The PF-ODE field of (x, delta log p) in t."""

    def __init__(self, sde, score_fn):
        self.field = _drift_and_divergence(sde, CountingScore(score_fn), "exact", None)
        self.accepted: list[float] = []

    def __call__(self, t, state):
        return self.field(state[0], t)


class _LoggedField(_Field):
    """The same field, recording the end of every accepted step of an adaptive solver."""

    def callback_accept_step(self, t0, y0, dt):
        self.accepted.append(float(t0 + dt))


def _integrate(sde, mixture, x, method: str, **kwargs) -> tuple[torch.Tensor, list[float]]:
    """log p of x through the PF-ODE with torchdiffeq (exact p_T as the prior) and the accepted step ends."""
    field = (_Field if method == "rk4" else _LoggedField)(sde, mixture.score_fn(sde))
    times = torch.tensor([EPS, sde.T], dtype=x.dtype)
    state0 = (x, torch.zeros(x.shape[0], dtype=x.dtype))
    xs, deltas = torchdiffeq.odeint(field, state0, times, method=method, **kwargs)
    return mixture.marginal_log_prob(xs[-1], sde.T, sde) + deltas[-1], field.accepted


def resample_grid(knots: np.ndarray, steps: int) -> torch.Tensor:
    """`knots` (t_0 < ... < t_K) resampled to `steps` steps by linear interpolation in the step index."""
    index = np.linspace(0.0, 1.0, len(knots))
    return torch.tensor(np.interp(np.linspace(0.0, 1.0, steps + 1), index, knots), dtype=torch.float64)


def error_bpd(mixture, sde, x, logp: torch.Tensor) -> float:
    """Mean |log p - exact log p_eps| in bits/dim."""
    return float((logp - mixture.marginal_log_prob(x, EPS, sde)).abs().mean() / (mixture.dim * math.log(2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default="ring2d:vp,mix64:vp", help="comma-separated MIXTURE:SDE")
    parser.add_argument("--pilot_tols", type=csv_of(float, 1e-15, "tolerances"), default="1e-8,1e-6,1e-5")
    parser.add_argument("--nfe", type=csv_of(int, RK4_EVALS_PER_STEP, "score evaluations", RK4_EVALS_PER_STEP),
                        default="48,60,72", help="score evaluations of the fixed-grid passes (4 per step)")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    for problem in args.problems.split(","):
        name, _, sde_name = problem.partition(":")
        if sde_name not in SDES or name not in ("ring2d", "grid2d", "mix64"):
            parser.error(f"--problems: {problem!r} is not MIXTURE:SDE (ring2d, grid2d, mix64 : {', '.join(SDES)})")
    torch.set_num_threads(args.threads)
    budgets = args.nfe
    print("| problem | grid | " + " | ".join(f"A / B at {n} NFE" for n in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for problem in args.problems.split(","):
        name, sde_name = problem.split(":")
        mixture, sde = toy_mixture(name), SDES[sde_name]()
        batches = [mixture.sample(args.batch, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                   for seed in (0, 1)]
        adaptive = []
        for x in batches:
            logp, _, nfe = log_likelihood(sde, mixture.score_fn(sde), x, eps=EPS, divergence="exact",
                                          prior_logp=lambda z: mixture.marginal_log_prob(z, sde.T, sde))
            adaptive.append(f"{error_bpd(mixture, sde, x, logp):.1e} ({nfe} NFE)")
        print(f"| {problem} | adaptive default | {' / '.join(adaptive)} |" + " |" * (len(budgets) - 1), flush=True)
        for tol in args.pilot_tols:
            _, accepted = _integrate(sde, mixture, batches[0], "dopri5", rtol=tol, atol=tol,
                                     options={"norm": per_dim_norm(mixture.dim)})
            knots = np.array([EPS] + accepted[:-1] + [sde.T])
            cells = []
            for budget in budgets:
                grid = resample_grid(knots, budget // RK4_EVALS_PER_STEP)
                errors = [error_bpd(mixture, sde, x, _integrate(sde, mixture, x, "rk4", options={
                    "grid_constructor": lambda func, y0, t, grid=grid: grid})[0]) for x in batches]
                cells.append(" / ".join(f"{e:.1e}" for e in errors))
            print(f"| {problem} | rk4 on the dopri5 {tol:g} pilot's grid ({len(knots) - 1} steps) | "
                  + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

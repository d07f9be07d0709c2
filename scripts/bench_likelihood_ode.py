"""Accuracy vs cost of the PF-ODE likelihood on the analytic mixtures (exact scores, closed-form densities).

Two measurements, each printed as a Markdown table (and written as JSON with --out):

* ODE error: |log p_ODE - log p_eps exact| / (D log 2) in bits/dim (mean over the batch), exact divergence,
  exact mixture score, the prior at T replaced by the exact marginal p_T (so only the integration error is
  left), and the score evaluations (NFE) of one pass, for each integrator setting.
* Per-image estimator error: |log p with the divergence estimator - log p with the exact divergence| / (D log 2)
  per image (RMS over images and --seeds probe draws), same integrator, and the wall time relative to one
  Rademacher probe (median over the --seeds timed passes of each; the reference is timed the same way).
  Estimators are DIVERGENCE[:N_PROBES], e.g. hutchinson_rademacher:4 or hutchpp:3 (N_PROBES = sketch size k
  for Hutch++, 3k VJPs per evaluation).

Examples:
  python scripts/bench_likelihood_ode.py
  python scripts/bench_likelihood_ode.py --problems ring2d:vp,mix64:vp --settings old_default,paper,default
  python scripts/bench_likelihood_ode.py --problems ring2d:vp --settings default \
      --estimators hutchinson_rademacher,hutchinson_rademacher:4,hutchpp:2,hutchpp:3,hutchpp:4 --seeds 5
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic_io import write_json  # noqa: E402
from data import toy_mixture  # noqa: E402
from likelihood import log_likelihood  # noqa: E402
from errors import UserError  # noqa: E402
from scripts.arg_types import positive_int  # noqa: E402
from sde_lib import VESDE, VPSDE, subVPSDE  # noqa: E402

SDES = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE}
EPS = 1e-5
# Integrator settings: keyword arguments of log_likelihood ("default" = the current defaults).
SETTINGS = {
    "default": {},
    "old_default": {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "error_norm": "max_rms", "time_variable": "t"},
    "paper": {"method": "scipy_rk45", "rtol": 1e-5, "atol": 1e-5, "time_variable": "t"},
}


def _setting(name: str) -> dict:
    """log_likelihood keyword arguments of a named setting, or of METHOD/TOL/NORM/VARIABLE[/STATE]
    (e.g. dopri5/1e-4/joint_rms/log_sigma/x_over_alpha; NORM per_dim, max_rms or joint_rms, VARIABLE t,
    log_sigma or sigma, optional STATE x or x_over_alpha)."""
    if name in SETTINGS:
        return dict(SETTINGS[name])
    try:
        method, tol, norm, variable, *state = name.split("/")
        return {"method": method, "rtol": float(tol), "atol": float(tol), "time_variable": variable,
                "state": state[0] if state else "x", "error_norm": norm}
    except ValueError:
        raise UserError(f"--settings: {name!r} is neither {', '.join(SETTINGS)} nor METHOD/TOL/NORM/VARIABLE"
                        "[/STATE]") from None


def ode_error(mixture, sde, x, setting: str) -> tuple[float, int]:
    """Mean ODE error in bits/dim (exact divergence and score, exact p_T) and the NFE of one pass."""
    prior = lambda z: mixture.marginal_log_prob(z, sde.T, sde)  # noqa: E731
    logp, _, nfe = log_likelihood(sde, mixture.score_fn(sde), x, eps=EPS, divergence="exact", prior_logp=prior,
                                  **_setting(setting))
    exact = mixture.marginal_log_prob(x, EPS, sde)
    return float((logp - exact).abs().mean() / (mixture.dim * math.log(2))), nfe


def estimator_error(mixture, sde, x, divergence: str, n_probes: int, seeds: int) -> tuple[float, float, float, int]:
    """RMS per-image error in bits/dim of the estimator against the exact divergence over `seeds` probe draws
    (seeds 0, 1, ...), the mean error (its bias plus noise), the median wall seconds and the median NFE of a pass."""
    score = mixture.score_fn(sde)
    exact, _, _ = log_likelihood(sde, score, x, eps=EPS, divergence="exact")
    errors, seconds, nfes = [], [], []
    for seed in range(seeds):
        start = time.perf_counter()
        est, _, nfe = log_likelihood(sde, score, x, eps=EPS, divergence=divergence, n_probes=n_probes,
                                     generator=torch.Generator().manual_seed(seed))
        seconds.append(time.perf_counter() - start)
        nfes.append(nfe)
        errors.append((est - exact) / (mixture.dim * math.log(2)))
    err = torch.stack(errors)
    return float(err.pow(2).mean().sqrt()), float(err.mean()), statistics.median(seconds), int(statistics.median(nfes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default="ring2d:vp,mix64:vp,ring2d:subvp,ring2d:ve,mix64:ve",
                        help="comma-separated MIXTURE:SDE")
    parser.add_argument("--settings", default="old_default,paper,default")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--estimators", default="hutchinson_gaussian,hutchinson_rademacher",
                        help="divergence estimators for the per-image table (mix64, VP); empty to skip")
    parser.add_argument("--seeds", type=positive_int, default=1,
                        help="probe draws (and timed passes) per estimator in the per-image table")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    for problem in args.problems.split(","):  # all of them before the first solve
        name, _, sde_name = problem.partition(":")
        if sde_name not in SDES:
            parser.error(f"--problems: {problem!r} is not MIXTURE:SDE with SDE one of {', '.join(SDES)}")
        try:
            toy_mixture(name)
        except ValueError as error:
            parser.error(f"--problems: {error}")
    for setting in args.settings.split(","):
        _setting(setting)
    torch.set_num_threads(args.threads)
    results = {"command": " ".join(["python"] + sys.argv),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"torch {torch.__version__}, {args.threads} thread(s)", "ode": [], "estimators": []}
    print("| problem | setting | ODE error (bits/dim) | NFE |\n|---|---|---|---|")
    for problem in args.problems.split(","):
        name, sde_name = problem.split(":")
        mixture, sde = toy_mixture(name), SDES[sde_name]()
        x = mixture.sample(args.batch, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for setting in args.settings.split(","):
            error, nfe = ode_error(mixture, sde, x, setting)
            results["ode"].append({"problem": problem, "setting": setting, "error_bpd": error, "nfe": nfe})
            print(f"| {problem} | {setting} | {error:.1e} | {nfe} |", flush=True)
    if args.estimators:
        mixture, sde = toy_mixture("mix64"), VPSDE()
        x = mixture.sample(args.batch, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        estimator_error(mixture, sde, x, "hutchinson_rademacher", 1, 1)  # warm-up
        *_, reference, _ = estimator_error(mixture, sde, x, "hutchinson_rademacher", 1, max(3, args.seeds))
        print(f"\n| mix64 VP estimator | probes | RMS per-image error (bits/dim), {args.seeds} draw(s) | mean error "
              "| time / 1 Rademacher probe | NFE |\n|---|---|---|---|---|---|")
        for spec in args.estimators.split(","):
            divergence, _, probes = spec.partition(":")
            error, bias, seconds, nfe = estimator_error(mixture, sde, x, divergence, int(probes or 1), args.seeds)
            results["estimators"].append({"divergence": divergence, "n_probes": int(probes or 1), "seeds": args.seeds,
                                          "rms_error_bpd": error, "mean_error_bpd": bias,
                                          "time_ratio": seconds / reference, "median_nfe": nfe})
            print(f"| {divergence} | {probes or 1} | {error:.1e} | {bias:+.1e} | {seconds / reference:.2f} | {nfe} |",
                  flush=True)
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

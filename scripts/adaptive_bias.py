"""Bias of the adaptive reverse-SDE sampler against the exact ring2d mixture, per rtol.

    python scripts/adaptive_bias.py --sde ve --rtol 0.05,0.01,0.002 --seeds 3

For each rtol, `--seeds` runs of `--num_samples` samples (prior noise and sampler noise seeded per run) report
the mean radius (exact: the mixture's, from 200,000 exact draws) and the mean log-density gap
E_true[log p] - E_samples[log p], each as the mean over runs with its standard error across runs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import toy_mixture  # noqa: E402
from sde_lib import VESDE, VPSDE  # noqa: E402
from errors import UserError  # noqa: E402
from scripts.arg_types import csv_of, positive_int  # noqa: E402
from solvers import sample  # noqa: E402


def main(argv=None) -> None:
    """Print one line per rtol: mean radius and log-density gap with standard errors, NFE used."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sde", default="ve", choices=("vp", "ve"))
    parser.add_argument("--rtol", type=csv_of(float, 1e-12, "tolerances"), default="0.05,0.01,0.002")
    parser.add_argument("--noise", default="bridge", choices=("bridge", "fresh"))
    parser.add_argument("--num_samples", type=positive_int, default=2000)
    parser.add_argument("--seeds", type=positive_int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sde = VESDE() if args.sde == "ve" else VPSDE()
    mixture = toy_mixture("ring2d")
    exact = mixture.sample(200000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    radius, logp = exact.norm(dim=1), mixture.log_prob(exact)
    n = args.num_samples
    print(f"exact mean radius {radius.mean():.4f} (standard error of one run of {n}: "
          f"{radius.std() / math.sqrt(n):.4f}); noise={args.noise}, sde={args.sde}")
    for rtol in args.rtol:
        radii, gaps, nfes = [], [], []
        for seed in range(args.seeds):
            x_T = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
            x, used = sample(sde, mixture.score_fn(sde), (n, 2), solver="adaptive", x_T=x_T,
                             generator=torch.Generator().manual_seed(seed), rtol=rtol, noise=args.noise)
            radii.append(x.norm(dim=1).mean().item())
            gaps.append(logp.mean().item() - mixture.log_prob(x).mean().item())
            nfes.append(used)
        r, g = torch.tensor(radii), torch.tensor(gaps)
        se = (lambda v: (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else float("nan"))
        print(f"rtol {rtol:g}: mean radius {r.mean():.4f} +- {se(r):.4f}, log-density gap {g.mean():+.4f} "
              f"+- {se(g):.4f}, NFE {sum(nfes) / len(nfes):.0f}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

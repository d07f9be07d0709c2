"""How smooth in t is a trained network's noise prediction? Mean |eps|, |d eps/dt| and |d2 eps/dt2| at fixed x.

A ratio |d2|/|d1| of about w means wiggles of angular frequency w in t, which an adaptive PF-ODE solver must
resolve at tight tolerances (docs/PERFORMANCE.md, "Trained networks").

    python scripts/likelihood_field_roughness.py --run runs/vp_digits
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from errors import UserError  # noqa: E402
from evaluation import load_run  # noqa: E402
from scripts.arg_types import csv_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run's folder")
    parser.add_argument("--times", type=csv_of(float, 1e-12, "times"), default="0.001,0.05,0.5,0.9",
                        help="start of each 1e-4 window of t")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = load_run(args.run, device="cpu")
    if run.config.data.get("kind", "toy") != "image":
        raise UserError(f"{args.run} is a run on {run.config.data.dataset!r}; this script measures image networks")
    if max(args.times) + 1e-4 > run.sde.T:
        raise UserError(f"--times: every window [t, t + 1e-4] must end by T = {run.sde.T}")
    run.model.double()
    size, channels = int(run.config.data.image_size), int(run.config.data.num_channels)
    x = torch.randn(4, channels, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    print("| t | mean abs eps | mean abs d eps/dt | mean abs d2 eps/dt2 | ratio (rad per unit t) |\n|---|---|---|---|---|")
    for lo in args.times:
        ts = torch.linspace(lo, lo + 1e-4, 41, dtype=torch.float64)
        with torch.no_grad():
            eps = torch.stack([-run.score_fn(x, torch.full((4,), float(t), dtype=torch.float64))
                               * run.sde.marginal_std(t) for t in ts])
        step = float(ts[1] - ts[0])
        d1 = (eps[1:] - eps[:-1]) / step
        d2 = (d1[1:] - d1[:-1]) / step
        a0, a1, a2 = (float(v.abs().mean()) for v in (eps, d1, d2))
        print(f"| {lo:g} | {a0:.3f} | {a1:.2f} | {a2:.0f} | {a2 / a1:.0f} |")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

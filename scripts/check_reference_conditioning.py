"""How the discrete `ssde_*` models are conditioned, against the reference's get_score_fn (score_sde_pytorch,
models/utils.py), at uniform random t: the share of t at which the old rule (step floor(t (N-1) + 1e-4) for
both the VE level and the DDPM std) picks another step than the reference, and the largest relative difference
between our score and the reference formula (a network output of ones, so the score is the conditioning only).

    python scripts/check_reference_conditioning.py [--num_t 10000] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import configs  # noqa: E402
import models  # noqa: E402
from scripts.arg_types import positive_int  # noqa: E402
from sde_lib import get_sde  # noqa: E402


class _Ones(torch.nn.Module):
    """Stands in for the network: output ones, remember the labels."""

    def forward(self, x, labels):
        self.labels = labels
        return torch.ones_like(x)


def reference_steps(config, t: torch.Tensor) -> torch.Tensor:
    """The reference's step: VE level round((T - t)(N - 1)) (0 = sigma_max); DDPM std index (t (N - 1)).long()."""
    n = int(config.sde.num_scales)
    if config.sde.name == "vesde":
        return torch.round((1.0 - t) * (n - 1)).long()
    return (t * (n - 1)).long()


def old_steps(config, t: torch.Tensor) -> torch.Tensor:
    """The rule used before issue 11: floor(t (N - 1) + 1e-4), as an index of the same table."""
    n = int(config.sde.num_scales)
    index = torch.floor(t * (n - 1) + 1e-4).long()
    return (n - 1) - index if config.sde.name == "vesde" else index


def reference_score_of_ones(config, t: torch.Tensor) -> torch.Tensor:
    """The reference's score for a network output of ones (VE: the network's own output; VP: -1 / std)."""
    s, n = config.sde, int(config.sde.num_scales)
    if s.name == "vesde":
        return torch.ones_like(t, dtype=torch.float64)
    betas = torch.linspace(s.beta_min / n, s.beta_max / n, n, dtype=torch.float64)
    return -1.0 / torch.sqrt(1.0 - torch.cumprod(1.0 - betas, 0))[reference_steps(config, t)]


def main(argv: list[str] | None = None) -> int:
    """Print one line per discrete ssde config."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_t", type=positive_int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t = torch.rand(args.num_t, generator=torch.Generator().manual_seed(args.seed))  # float32, as a sampler's t
    for name in [n for n in configs.available_configs() if n.startswith("ssde_")]:
        config = configs.get_config(name)
        if config.training.continuous:
            continue
        net = _Ones()
        score = models.get_score_fn(get_sde(config), net, continuous=False)(torch.zeros(t.shape[0], 1), t)
        ref = reference_score_of_ones(config, t)
        rel = float(((score[:, 0].double() - ref) / ref).abs().max())
        moved = float((old_steps(config, t) != reference_steps(config, t)).double().mean())
        line = f"{name}: old rule picks another step at {100 * moved:.2f}% of t; max rel. score diff now {rel:.1e}"
        if config.sde.name == "vesde":
            level = (int(config.sde.num_scales) - 1) - reference_steps(config, t)
            sigma_ref = get_sde(config).discrete_sigmas(level.double())
            line += f"; max rel. sigma diff now {float(((net.labels.double() - sigma_ref) / sigma_ref).abs().max()):.1e}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

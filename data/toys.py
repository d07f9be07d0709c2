"""Sample-only 2-D toy distributions (no closed-form score): two moons, swiss roll, checkerboard."""
from __future__ import annotations

import math

import torch


def _uniform(n, generator, dtype):
    return torch.rand(n, generator=generator, dtype=torch.float64).to(dtype)


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05, dtype=torch.float32):
    """Two interleaved half circles, centred and scaled to about [-2, 2]."""
    half = torch.rand(n, generator=generator) < 0.5
    angle = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], 1)
    x = torch.where(half[:, None], upper, lower)
    x = x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return ((x - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 1.6).to(dtype)


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.05, dtype=torch.float32):
    """The 2-D swiss roll r = theta, scaled to about [-2, 2]."""
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    x = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], 1) / 7.0
    return (x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)).to(dtype)


def checkerboard(n: int, generator: torch.Generator | None = None, dtype=torch.float32):
    """Uniform on the 8 dark squares ((i + j) even) of a 4x4 checkerboard over [-2, 2]^2."""
    cells = torch.tensor([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=torch.float64)
    pick = torch.randint(len(cells), (n,), generator=generator)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    return (cells[pick] + u - 2.0).to(dtype)


SAMPLE_TOYS = {"moons": two_moons, "swissroll": swiss_roll, "checkerboard": checkerboard}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """n samples of a named 2-D toy: a mixture from `toy_mixture` or one of SAMPLE_TOYS."""
    from data.mixtures import TOY_MIXTURES, toy_mixture

    if name in TOY_MIXTURES:
        return toy_mixture(name).sample(n, generator=generator, dtype=dtype)
    if name not in SAMPLE_TOYS:
        raise ValueError(f"unknown toy data set {name!r}; valid: {', '.join(list(TOY_MIXTURES) + list(SAMPLE_TOYS))}")
    return SAMPLE_TOYS[name](n, generator=generator, dtype=dtype)

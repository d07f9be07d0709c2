"""Name -> sampler table used by `solvers.sample` and the CLI.

Every sampler has the signature
    fn(sde, score_fn, shape, *, nfe, eps, x_T, generator, **options) -> (samples, nfe_used)
and counts its own score evaluations. Samplers run under torch.no_grad(): score functions that need gradients
inside (classifier guidance) enable them locally with torch.enable_grad().
"""
from __future__ import annotations

from typing import Callable

import torch

SAMPLERS: dict[str, Callable] = {}


def register(name: str):
    """Decorator adding a sampler to the table under `name`; the sampler runs under torch.no_grad() (no
    autograd graph through the sampling chain, whatever the score network's parameters require)."""
    def add(fn: Callable) -> Callable:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} registered twice")
        SAMPLERS[name] = torch.no_grad()(fn)
        return SAMPLERS[name]
    return add

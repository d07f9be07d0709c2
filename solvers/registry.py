"""Name -> sampler table used by `solvers.sample` and the CLI.

Every sampler has the signature
    fn(sde, score_fn, shape, *, nfe, eps, x_T, generator, **options) -> (samples, nfe_used)
and counts its own score evaluations.
"""
from __future__ import annotations

from typing import Callable

SAMPLERS: dict[str, Callable] = {}


def register(name: str):
    """Decorator adding a sampler to the table under `name`."""
    def add(fn: Callable) -> Callable:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} registered twice")
        SAMPLERS[name] = fn
        return fn
    return add

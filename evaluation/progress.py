"""Per-step progress for the commands: a tqdm bar advanced by every score evaluation of a sampler or solver.

The samplers know nothing of progress bars (solvers/ takes a plain `score_fn(x, t)`); the command layer wraps
the score function so that each evaluation (one step of a one-evaluation-per-step sampler) moves the bar.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch
from tqdm import tqdm


class ProgressScore:
    """`score_fn` that advances `bar` by one per evaluation (the bar counts score evaluations, NFE)."""

    def __init__(self, score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bar: tqdm):
        self.score_fn = score_fn
        self.bar = bar

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.bar.update(1)
        return self.score_fn(x, t)


@contextlib.contextmanager
def nfe_bar(total: int | None, desc: str, enabled: bool = True) -> Iterator[tqdm]:
    """A tqdm bar in score evaluations (unit "NFE"); `total` None when the count is not known in advance."""
    bar = tqdm(total=total, desc=desc, unit="NFE", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5, leave=False)
    try:
        yield bar
    finally:
        bar.close()

"""Samplers that take an `SDE` and a `score_fn(x, t)` and report their number of score evaluations."""
from __future__ import annotations

import inspect
import warnings

import torch

from errors import UserError
from solvers.common import ShapeCheckedScore, check_nfe, check_sample_shape, check_state_tensor
from solvers.registry import SAMPLERS, register
from solvers.timesteps import check_eps

# Importing the sampler modules fills the table (each module registers its names).
from solvers import pc, ald, ode, torchsde_sampler  # noqa: E402,F401  (em, pc, reverse_diffusion, ancestral, ald, ode*, sde_*)
from solvers.ode import decode, encode  # noqa: E402
from solvers.accel import accelerate_score_fn  # noqa: E402
from solvers import adaptive, ddim, dpm_solver, heun  # noqa: E402,F401  (adaptive, ddim, dpm*, heun, edm_stochastic)


def available_solvers() -> list[str]:
    """Names accepted by `sample(..., solver=NAME)` and `main.py --solver`."""
    return sorted(SAMPLERS)


@torch.no_grad()
def sample(sde, score_fn, shape, solver: str = "em", nfe: int | None = None, eps: float = 1e-3,
           x_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
           compile: bool = False, cuda_graph: bool = False, **options):
    """Draw samples of `shape` with the named solver; returns (samples, nfe_used).

    `compile` / `cuda_graph` (opt-in, see solvers/accel.py) run the network through torch.compile and/or
    replay it from a CUDA graph; meant for the fixed-step samplers, a plain call on CPU.
    """
    if solver not in SAMPLERS:
        raise UserError(f"unknown solver {solver!r}; valid: {', '.join(available_solvers())}")
    shape = check_sample_shape(shape)
    check_nfe(nfe)
    eps = check_eps(sde, eps, solver)
    if x_T is not None and tuple(check_state_tensor(x_T, "x_T").shape) != shape:
        raise UserError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    accepted = [name for name in inspect.signature(SAMPLERS[solver]).parameters
                if name not in ("sde", "score_fn", "shape", "nfe", "eps", "x_T", "generator")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"solver {solver!r} has no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(accepted) or 'none'}")
    if compile or cuda_graph:
        score_fn = accelerate_score_fn(score_fn, compile=compile, cuda_graph=cuda_graph)
    x, used = SAMPLERS[solver](sde, ShapeCheckedScore(score_fn), shape, nfe=nfe, eps=eps, x_T=x_T,
                               generator=generator, **options)
    if not bool(torch.isfinite(x).all()):  # one synchronisation per call: NaN samples are never returned silently
        warnings.warn(f"{solver}: {int((~torch.isfinite(x)).sum())} of {x.numel()} sample values are NaN or inf "
                      "(a diverging score, or a step too large for it)", RuntimeWarning, stacklevel=2)
    return x, used


__all__ = ["sample", "available_solvers", "SAMPLERS", "register", "encode", "decode"]

"""Small helpers shared by the samplers: budgets, prior noise, reproducible Gaussian draws, NFE counting."""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch

from errors import UserError
from sde_lib import SDE, VESDE, VPSDE, batch_time, broadcast_to, subVPSDE


def check_budget(nfe: int | None, default: int, name: str) -> int:
    """The score-evaluation budget as a positive int (`default` when None); 2.7, True or inf are refused."""
    if nfe is None:
        return default
    try:
        return check_nfe(nfe)
    except UserError as error:
        raise UserError(f"{name}: {error}") from None


def steps_for_budget(budget: int, cost_per_step: int, fixed_cost: int, name: str) -> int:
    """Largest number of steps whose evaluations (steps * cost + fixed) fit the budget; >= 1 or UserError."""
    steps = (budget - fixed_cost) // cost_per_step
    if steps < 1:
        raise UserError(f"{name}: nfe={budget} is too small; one step needs {cost_per_step + fixed_cost} "
                        "score evaluations")
    return steps


def check_choice(value: str, valid: Iterable[str], what: str) -> str:
    """Return `value` if it is one of `valid`, else a UserError listing them."""
    valid = list(valid)
    if value not in valid:
        raise UserError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value


def require_sde(sde: SDE, kinds: tuple[type, ...], solver: str) -> None:
    """UserError unless `sde` is exactly one of `kinds` (subVPSDE does not count as a VPSDE here)."""
    if type(sde) not in kinds:
        names = ", ".join(k.__name__ for k in kinds)
        raise UserError(f"solver {solver!r} is not valid for {type(sde).__name__}; it needs {names}")


def initial_state(sde: SDE, shape, x_T: torch.Tensor | None, generator: torch.Generator | None,
                  device=None, dtype=None) -> torch.Tensor:
    """x_T if given (cloned), else a prior draw on the generator's (or given) device."""
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise UserError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        return x_T.clone()
    if device is None and generator is not None:
        device = generator.device
    return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype or torch.float32)


def gaussian_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise with x's shape, dtype and device, drawn from `generator` when given."""
    if generator is None or generator.device == x.device:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    # A generator on another device: draw there, then move (no synchronisation needed for the copy).
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def with_steps(sde: SDE, n: int) -> SDE:
    """A copy of `sde` whose discrete chain has `n` steps (DDPM betas / SMLD sigmas re-spaced for n)."""
    chain = copy.copy(sde)
    chain.N = int(n)
    return chain


def check_sample_shape(shape) -> tuple[int, ...]:
    """A sample shape as a tuple of positive ints (batch first), else a UserError naming it."""
    dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise UserError(f"shape must be a tuple of positive integers (batch, ...), got {shape!r}")
    return dims


def check_nfe(nfe) -> int | None:
    """An NFE budget: None or a positive integer (2.7, True or inf are refused, not truncated)."""
    if nfe is None:
        return None
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe <= 0:
        raise UserError(f"nfe must be a positive integer, got {nfe!r}")
    return nfe


def check_state_tensor(x, what: str) -> torch.Tensor:
    """A floating-point torch tensor (a starting state or data), else a UserError naming `what`."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"{what} must be a floating-point torch tensor, got {kind}")
    return x


class ShapeCheckedScore:
    """Wraps a score_fn: its output must be a tensor of the input's shape (broadcasting would be silently wrong)."""

    def __init__(self, score_fn: Callable):
        self.score_fn = score_fn

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.score_fn(x, t)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"score_fn returned {got} for x of shape {tuple(x.shape)}; it must return the "
                            "score with x's shape")
        return out


class CountingScore:
    """Wraps a score_fn and counts its calls in a Python int (no device synchronisation)."""

    def __init__(self, score_fn: Callable):
        self.score_fn = score_fn
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.score_fn(x, t)


def tweedie_denoise(sde: SDE, score_fn: Callable, x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x(0) | x(t)] = (x + sigma(t)^2 score(x, t)) / alpha(t) (Tweedie's formula); one score evaluation."""
    tt = batch_time(t, x)
    std = broadcast_to(sde.marginal_std(tt), x)
    alpha = broadcast_to(sde.mean_coeff(tt), x)
    return (x + std ** 2 * score_fn(x, tt)) / alpha


VP_FAMILY = (VPSDE, subVPSDE)
VE_ONLY = (VESDE,)

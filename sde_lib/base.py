"""Abstract SDE `dx = f(x, t) dt + g(t) dw` and its time reversal (Song et al., 2021)."""
from __future__ import annotations

import abc
import math
from typing import Callable

import numpy as np
import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batch_time(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return `t` as a (batch,) tensor on x's device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


def broadcast_to(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (batch,) tensor so that it broadcasts against x of shape (batch, ...)."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class SDE(abc.ABC):
    """A forward SDE on [0, T] with a Gaussian transition kernel and an N-step discretization."""

    def __init__(self, N: int):
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or int(N) < 1:  # 2.5 is not truncated
            raise ValueError(f"number of discretization steps N must be an integer >= 1, got {N!r}")
        self.N = int(N)

    @property
    def T(self) -> float:
        """End time of the forward process."""
        return 1.0

    # --- quantities every linear SDE of the family defines -------------------------
    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) (shape of x) and diffusion g(t) (shape (batch,))."""

    @abc.abstractmethod
    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """alpha(t) such that E[x(t) | x(0)] = alpha(t) x(0)."""

    @abc.abstractmethod
    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """Standard deviation sigma(t) of x(t) given x(0)."""

    @abc.abstractmethod
    def prior_sampling(self, shape, generator: torch.Generator | None = None,
                       device=None, dtype=None) -> torch.Tensor:
        """Draw samples from the prior p_T."""

    @abc.abstractmethod
    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior, per sample, summed over all non-batch dimensions."""

    # --- derived quantities ----------------------------------------------------------
    def marginal_prob(self, x0: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (shape of x0) and std (shape (batch,)) of the perturbation kernel p_0t(x(t) | x(0))."""
        t = batch_time(t, x0)
        return broadcast_to(self.mean_coeff(t), x0) * x0, self.marginal_std(t)

    def discrete_index(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Index i in 0..N-1 of the discrete step at time t (t = i T / (N-1) on the grid)."""
        t = batch_time(t, x)
        # The small offset keeps t = i T/(N-1) at index i despite rounding.
        idx = torch.floor(t * (self.N - 1) / self.T + 1e-4).long()
        return idx.clamp(0, self.N - 1)

    def step_time(self, i: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Time of discrete step i, t_i = i T / (N-1), rounded up in `dtype` (by an ulp or two where needed)
        so that the reference's step position t_i (N-1) truncates back to i (`labels.long()` in Song et al.'s
        discrete VP score; in float32 i / 999 * 999 falls just below i for 170 of the 1000 steps)."""
        i = torch.as_tensor(i)
        target = i.to(dtype)
        t = target * (self.T / (self.N - 1))
        for _ in range(2):  # fixed count: no host synchronisation on accelerators
            t = torch.where(t * (self.N - 1) < target, torch.nextafter(t, torch.full_like(t, math.inf)), t)
        return t

    def discretize(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step x_{i+1} = x_i + f + G z of the discrete chain; Euler-Maruyama with dt = T/N by default."""
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (eq. 6), or with probability_flow=True the probability-flow ODE (eq. 13)."""
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """Reverse-time process; `sde` and `discretize` give the coefficients for time running from T to 0.

    A step backwards by dt > 0 is x(t - dt) = x(t) - drift dt + diffusion sqrt(dt) z.
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        self.N = forward.N

    @property
    def T(self) -> float:
        return self.forward.T

    def _reverse(self, x, t, f, g):
        # eq. 6: dx = [f - g^2 score] dt + g dw_bar;  eq. 13: dx = [f - g^2 score / 2] dt
        weight = 0.5 if self.probability_flow else 1.0
        score = self.score_fn(x, batch_time(t, x))
        drift = f - broadcast_to(g ** 2, x) * score * weight
        diffusion = torch.zeros_like(g) if self.probability_flow else g
        return drift, diffusion

    def sde(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift and diffusion of the reverse-time SDE (or PF-ODE) at (x, t)."""
        f, g = self.forward.sde(x, t)
        return self._reverse(x, t, f, g)

    def discretize(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse of the forward chain's step: x_{i-1} = x_i - f_rev + G_rev z."""
        f, g = self.forward.discretize(x, t)
        return self._reverse(x, t, f, g)


def _finite_number(value) -> bool:
    """A real, finite number (not a bool or text): an SDE parameter."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(float(value)))

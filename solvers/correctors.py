"""Correctors of the PC sampler: score-based MCMC at a fixed time t (Song et al., 2021, app. G)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from errors import UserError
from sde_lib import SDE, VPSDE, batch_time, broadcast_to

Noise = Callable[[], torch.Tensor]


class Corrector:
    """Base class: `update(x, t, noise) -> (x, x_mean)` with `nfe_per_step` score evaluations."""

    def __init__(self, sde: SDE, score_fn: Callable, corrector_steps: int = 1, snr: float = 0.16,
                 t_min: float = 1e-3, step_size: float | None = None):
        if int(corrector_steps) < 1:
            raise UserError(f"corrector_steps (config sampling.n_steps_each) must be >= 1, got {corrector_steps}")
        self.sde = sde
        self.score_fn = score_fn
        self.corrector_steps = int(corrector_steps)
        self.snr = float(snr)
        self.t_min = float(t_min)
        self.step_size = step_size

    @property
    def nfe_per_step(self) -> int:
        return self.corrector_steps

    def _alpha(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """alpha_i of Song et al. 2021 alg. 4/5: 1 - beta_i of the SDE's own chain for VP and sub-VP, 1 for VE."""
        if isinstance(self.sde, VPSDE):
            return 1.0 - self.sde.discrete_betas(self.sde.discrete_index(t, x).to(x.dtype))
        return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)

    def update(self, x: torch.Tensor, t: torch.Tensor, noise: Noise):
        raise NotImplementedError


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)


class LangevinCorrector(Corrector):
    """Langevin MCMC with step 2 alpha_i (snr ||z|| / ||s||)^2 (Song et al., 2021, alg. 4 for VE, alg. 5 for VP).

    ||z|| and ||s|| are per-sample norms averaged over the batch, as in the paper's implementation: in low
    dimension a per-sample ratio explodes wherever the score nearly vanishes (between modes).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.step_size is not None:
            raise UserError("step_size applies to the 'ald' corrector only; the Langevin corrector's step is "
                            "set by snr")
        if not (math.isfinite(self.snr) and self.snr > 0):  # snr < 0 gave garbage samples without a word
            raise UserError(f"Langevin snr must be a positive number, got {self.snr}")

    def update(self, x, t, noise):
        tt = batch_time(t, x)
        alpha = self._alpha(x, tt)
        x_mean = x
        for _ in range(self.corrector_steps):
            grad = self.score_fn(x, tt)
            z = noise()
            ratio = _per_sample_norm(z).mean() / _per_sample_norm(grad).mean()
            step = 2 * alpha * (self.snr * ratio) ** 2
            x_mean = x + broadcast_to(step, x) * grad
            x = x_mean + broadcast_to(torch.sqrt(2 * step), x) * z
        return x, x_mean


class AnnealedLangevinCorrector(Corrector):
    """Annealed Langevin dynamics: step 2 alpha_i (snr sigma(t))^2 (the score SDE code's AnnealedLangevinDynamics).

    x_mean = x + step s(x, t), x = x_mean + sqrt(2 step) z, with sigma(t) the marginal std and alpha_i as in the
    Langevin corrector (1 - beta_i for VP / sub-VP, 1 for VE). This is Song & Ermon's (2019, alg. 1) step
    alpha_SE = eps sigma_i^2 / sigma_L^2 with x + alpha_SE / 2 s + sqrt(alpha_SE) z, for
    snr = sqrt(eps) / (2 sigma_L): `step_size` (their eps), when given, sets snr that way (sigma_L = sigma(t_min)),
    so NCSN's parameterization and the reference's are one corrector (for VP, alpha_i multiplies both).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.step_size is not None:
            if self.step_size <= 0:
                raise UserError(f"annealed Langevin step_size must be positive, got {self.step_size}")
            sigma_min = float(self.sde.marginal_std(torch.tensor(self.t_min, dtype=torch.float64)))
            self.snr = float(self.step_size) ** 0.5 / (2.0 * sigma_min)
        if self.snr <= 0:
            raise UserError(f"annealed Langevin snr must be positive, got {self.snr}")

    def update(self, x, t, noise):
        tt = batch_time(t, x)
        step = broadcast_to(2.0 * self._alpha(x, tt) * (self.snr * self.sde.marginal_std(tt)) ** 2, x)
        x_mean = x
        for _ in range(self.corrector_steps):
            x_mean = x + step * self.score_fn(x, tt)
            x = x_mean + torch.sqrt(2.0 * step) * noise()
        return x, x_mean


class NoneCorrector(Corrector):
    """Leaves x unchanged; no score evaluations."""

    @property
    def nfe_per_step(self) -> int:
        return 0

    def update(self, x, t, noise):
        return x, x


CORRECTORS: dict[str, type[Corrector]] = {
    "langevin": LangevinCorrector,
    "ald": AnnealedLangevinCorrector,
    "none": NoneCorrector,
}

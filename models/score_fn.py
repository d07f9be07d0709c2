"""Turn a network output into a score s(x, t) = grad_x log p_t(x), with the conventions of Song et al. (2021)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from errors import UserError
from sde_lib import SDE, VESDE, VPSDE, subVPSDE

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Continuous VP / sub-VP networks see 999 t, so a model trained in continuous time takes the
# same labels as a DDPM network with N = 1000 steps (reference convention).
VP_LABEL_SCALE = 999.0


def _time(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t as a (batch,) tensor on x's device in at least float32 (labels like 999 t need the precision)."""
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    t = torch.as_tensor(t, device=x.device).to(dtype)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise UserError(f"t must be a scalar or a (batch,) tensor with batch {x.shape[0]}, got {tuple(t.shape)}")
    return t


def _expand(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (out.ndim - 1))


def discrete_vp_std(sde: VPSDE, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """DDPM's sqrt(1 - prod_{j <= i} (1 - beta_j)) at step indices `index` (Ho et al., 2020, eq. 4)."""
    steps = torch.arange(sde.N, device=index.device, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - sde.discrete_betas(steps), dim=0)
    return torch.sqrt(1.0 - alphas_cumprod)[index].to(dtype)


def discrete_ve_index(sde: VESDE, t: torch.Tensor) -> torch.Tensor:
    """The reference's noise-level index round((T - t)(N - 1)) (0 = sigma_max), half to even as torch.round."""
    return torch.round((sde.T - t) * (sde.N - 1)).long().clamp(0, sde.N - 1)


def discrete_vp_index(sde: VPSDE, labels: torch.Tensor) -> torch.Tensor:
    """The reference's DDPM step index of the label t (N - 1): `labels.long()`, truncation toward zero."""
    return labels.long().clamp(0, sde.N - 1)


def noise_labels(sde: SDE, t: torch.Tensor, x: torch.Tensor, continuous: bool = True) -> torch.Tensor:
    """The conditioning input the network gets at time t: 999 t / t (N-1) (VP, sub-VP), sigma (VE).

    Discrete VE (Song et al.'s `get_score_fn`): index i = round((T - t)(N - 1)) into the descending table
    sigma_max .. sigma_min, i.e. SMLD's ascending sigma_{N-1-i}; our network gets that sigma.
    """
    t = _time(t, x)
    if isinstance(sde, VPSDE):
        if continuous or isinstance(sde, subVPSDE):
            return t * VP_LABEL_SCALE
        return t * (sde.N - 1)  # the reference feeds the unrounded step position t (N-1)
    if isinstance(sde, VESDE):
        if continuous:
            return sde.sigma(t)
        level = (sde.N - 1) - discrete_ve_index(sde, t)  # ascending index of the same noise level
        return sde.discrete_sigmas(level.to(torch.float64)).to(t.dtype)
    raise UserError(f"get_score_fn supports VPSDE, subVPSDE and VESDE, got {type(sde).__name__}")


def get_score_fn(sde: SDE, model: nn.Module, continuous: bool = True) -> ScoreFn:
    """score_fn(x, t) for a network `model(x, labels)`; t is continuous in [0, T], a float or (batch,) tensor.

    VP / sub-VP: the network predicts the noise eps in x(t) = alpha(t) x(0) + std(t) eps, so the score
    is -eps_theta / std(t) (Song et al., 2021, app. C). Continuous: labels 999 t and std = marginal std;
    discrete (continuous=False, VP only): labels = t (N-1) and std = DDPM's sqrt(1 - alpha_bar_i) at
    i = labels.long() (truncation, as the reference's `sqrt_1m_alphas_cumprod[labels.long()]`).
    sub-VP has no discrete chain and always uses the continuous convention.
    VE: the network output is the score itself (it divides by sigma internally when configured);
    labels are sigma(t) (continuous) or the reference's discrete noise level (see `noise_labels`).
    The score has x's dtype, whatever precision the network ran in (e.g. bf16 autocast).
    """
    if not isinstance(sde, (VPSDE, VESDE)):
        raise UserError(f"get_score_fn supports VPSDE, subVPSDE and VESDE, got {type(sde).__name__}")

    if isinstance(sde, VPSDE):
        discrete = not continuous and not isinstance(sde, subVPSDE)

        def vp_score_fn(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
            t = _time(t, x)
            if discrete:
                labels = t * (sde.N - 1)  # the step position, unrounded, as in the reference
                std = discrete_vp_std(sde, discrete_vp_index(sde, labels), t.dtype)
            else:
                labels, std = t * VP_LABEL_SCALE, sde.marginal_std(t)
            out = model(x, labels)
            return (-out / _expand(std, out)).to(x.dtype)

        return vp_score_fn

    def ve_score_fn(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        return model(x, noise_labels(sde, t, x, continuous)).to(x.dtype)

    return ve_score_fn

"""Turn a network output into a score s(x, t) = grad_x log p_t(x), with the conventions of Song et al. (2021)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from errors import UserError
from models.parameterization import check_parameterization, edm_network_input, output_to_score
from sde_lib import SDE, EDMSDE, VESDE, VPSDE, subVPSDE

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
    if isinstance(sde, EDMSDE):
        return sde.sigma(t)  # EDM: the label is the noise level sigma = t (continuous time only)
    raise UserError(f"get_score_fn supports VPSDE, subVPSDE, VESDE and EDMSDE, got {type(sde).__name__}")


def get_score_fn(sde: SDE, model: nn.Module, continuous: bool = True, parameterization: str = "score",
                 sigma_data: float = 0.5, vp_label_scale: float = VP_LABEL_SCALE) -> ScoreFn:
    """score_fn(x, t) for a network `model(x, labels)`; t is continuous in [0, T], a float or (batch,) tensor.

    VP / sub-VP: the network predicts the noise eps in x(t) = alpha(t) x(0) + std(t) eps, so the score
    is -eps_theta / std(t) (Song et al., 2021, app. C). Continuous: labels 999 t and std = marginal std;
    discrete (continuous=False, VP only): labels = t (N-1) and std = DDPM's sqrt(1 - alpha_bar_i) at
    i = labels.long() (truncation, as the reference's `sqrt_1m_alphas_cumprod[labels.long()]`).
    sub-VP has no discrete chain and always uses the continuous convention.
    VE and EDM (sigma = t, continuous only): the network output is the score itself (it divides by sigma internally when configured);
    labels are sigma(t) (continuous) or the reference's discrete noise level (see `noise_labels`).
    The score has x's dtype, whatever precision the network ran in (e.g. bf16 autocast).
    Other `parameterization`s (eps, x0, v, edm with `sigma_data`; continuous time only) are converted by
    `models.parameterization.output_to_score`; "score" is the reference convention above.
    `vp_label_scale`: the continuous VP labels are vp_label_scale * t (999: a continuously trained network; N - 1
    for the continuous-time score of a network trained on DDPM's N steps, which sees step indices 0..N-1).
    """
    if not isinstance(sde, (VPSDE, VESDE, EDMSDE)):
        raise UserError(f"get_score_fn supports VPSDE, subVPSDE, VESDE and EDMSDE, got {type(sde).__name__}")
    if isinstance(sde, EDMSDE) and not continuous:
        raise UserError("the EDM SDE (sde.name='edm') has no discrete chain; set training.continuous=true")
    parameterization = check_parameterization(parameterization, sigma_data)
    if parameterization != "score":
        if not continuous:
            raise UserError(f"model.parameterization={parameterization!r} needs continuous time "
                            "(training.continuous=true); the discrete DDPM/SMLD conventions are those of 'score'")
        return _converted_score_fn(sde, model, parameterization, float(sigma_data))

    if isinstance(sde, VPSDE):
        discrete = not continuous and not isinstance(sde, subVPSDE)

        def vp_score_fn(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
            t = _time(t, x)
            if discrete:
                labels = t * (sde.N - 1)  # the step position, unrounded, as in the reference
                std = discrete_vp_std(sde, discrete_vp_index(sde, labels), t.dtype)
            else:
                labels, std = t * vp_label_scale, sde.marginal_std(t)
            out = model(x, labels)
            return (-out / _expand(std, out)).to(x.dtype)

        return vp_score_fn

    def ve_score_fn(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        return model(x, noise_labels(sde, t, x, continuous)).to(x.dtype)

    return ve_score_fn


def _converted_score_fn(sde: SDE, model: nn.Module, parameterization: str, sigma_data: float) -> ScoreFn:
    """score_fn of an eps / x0 / v / edm network (see models/parameterization.py for the equations)."""
    def score_fn(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        t = _time(t, x)
        alpha, std = sde.mean_coeff(t), sde.marginal_std(t)
        if parameterization == "edm":
            net_x, labels = edm_network_input(x, alpha, std, sigma_data)  # c_in x / alpha, ln(sigma) / 4
        else:
            net_x, labels = x, noise_labels(sde, t, x, continuous=True)
        out = model(net_x, labels)
        return output_to_score(parameterization, out, x, alpha, std, sigma_data).to(x.dtype)

    return score_fn


def score_fn_options(config) -> dict:
    """get_score_fn's parameterization and sigma_data from config.model (defaults: "score", 0.5)."""
    m = config.model
    return {"parameterization": str(m.get("parameterization", "score")), "sigma_data": float(m.get("sigma_data", 0.5))}

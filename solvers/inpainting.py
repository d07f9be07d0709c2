"""Inpainting and colorization with the predictor-corrector sampler (Song et al., 2021, app. I).

Inpainting: the known part of x(t) is not sampled but replaced, after every predictor and every corrector
step, by a forward-perturbed copy of the data, alpha(t) x0 + std(t) z (a draw of p_0t(x(t) | x0) restricted to
the known coordinates); the unknown part follows the reverse SDE with the unconditional score, and at the end
the known part is the data itself. The predictor and corrector steps are the PC sampler's own classes.
The method is approximate: the unknown part sees the known part through independent noisy copies, not through
p_t(x_known(t) | x_unknown(t), x0). With an exact Gaussian score (tests/test_inpainting.py: d = 3, one known
coordinate, EM + Langevin snr 0.3, NFE 400) the conditional mean is within 0.01 and the covariance about 10%
too wide; the corrector steps at small t do most of the conditioning.

Colorization: with an orthogonal 3x3 matrix M whose first row maps RGB to the gray direction (1, 1, 1)/sqrt(3),
y = M x per pixel "decouples" gray (y_0) and color (y_1, y_2). Because the forward SDE is isotropic it commutes
with M, the score in y-space is M score_x(M^T y), and colorization is inpainting of y_1, y_2 given y_0.
"""
from __future__ import annotations

import math

import torch

from errors import UserError
from sde_lib import SDE, batch_time, broadcast_to
from solvers.common import (CountingScore, check_budget, check_choice, gaussian_like, initial_state,
                            steps_for_budget)
from solvers.correctors import CORRECTORS
from solvers.predictors import PREDICTORS


def check_mask(mask: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The mask (1 = known, 0 = missing) as x0's dtype, broadcast to x0's shape; UserError if it cannot be."""
    mask = torch.as_tensor(mask)
    if mask.shape == x0.shape[1:]:
        mask = mask.unsqueeze(0)
    if mask.ndim != x0.ndim or any(m not in (1, s) for m, s in zip(mask.shape, x0.shape)):
        raise UserError(f"mask has shape {tuple(mask.shape)}; it must match the input {tuple(x0.shape)} "
                        f"(or one sample {tuple(x0.shape[1:])}, or broadcast to it)")
    mask = mask.to(device=x0.device, dtype=x0.dtype)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise UserError("mask values must be 0 (missing) or 1 (known)")
    return mask.expand_as(x0)


@torch.no_grad()
def inpaint(sde: SDE, score_fn, x0: torch.Tensor, mask: torch.Tensor, *, nfe: int | None = None,
            eps: float = 1e-3, generator: torch.Generator | None = None, predictor: str = "reverse_diffusion",
            corrector: str = "langevin", snr: float = 0.16, corrector_steps: int = 1, x_T: torch.Tensor | None = None,
            noise_removal: bool = True) -> tuple[torch.Tensor, int]:
    """Fill the coordinates where mask = 0 given x0 where mask = 1; returns (samples, nfe_used).

    x0 is in the model's space (batch, ...); the budget `nfe` buys n steps of predictor + corrector as in `pc`.
    """
    check_choice(predictor, PREDICTORS, "predictor")
    check_choice(corrector, CORRECTORS, "corrector")
    mask = check_mask(mask, x0)
    counter = CountingScore(score_fn)
    corr = CORRECTORS[corrector](sde, counter, corrector_steps=corrector_steps, snr=snr, t_min=eps)
    cost = PREDICTORS[predictor].nfe_per_step + corr.nfe_per_step
    if cost == 0:
        raise UserError("inpaint: predictor 'none' with corrector 'none' does nothing")
    n = steps_for_budget(check_budget(nfe, sde.N * cost, "inpaint"), cost, 0, "inpaint")
    pred = PREDICTORS[predictor](sde, counter, n)
    x = initial_state(sde, x0.shape, x_T, generator, x0.device, x0.dtype)
    times = pred.grid(eps, x.device, x.dtype)

    def noise() -> torch.Tensor:
        return gaussian_like(x, generator)

    def replace_known(x: torch.Tensor, x_mean: torch.Tensor, t: torch.Tensor):
        # known part <- alpha(t) x0 + std(t) z, a draw of the forward kernel p_0t (app. I)
        mean, std = sde.marginal_prob(x0, batch_time(t, x0))
        perturbed = mean + broadcast_to(std, x0) * noise()
        return x * (1 - mask) + perturbed * mask, x_mean * (1 - mask) + mean * mask

    x_mean = x
    for k in range(n):
        t, t_next = times[k], times[k + 1]
        x, x_mean = replace_known(*corr.update(x, t, noise), t)
        x, x_mean = replace_known(*pred.update(x, t, t_next, n - 1 - k, noise), t_next)
    x = x_mean if noise_removal else x
    return x * (1 - mask) + x0 * mask, counter.calls


def gray_color_basis(dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthogonal M (3x3): row 0 = (1, 1, 1)/sqrt(3) (gray), rows 1-2 span the color plane (Helmert basis)."""
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64)
    m = m / torch.tensor([math.sqrt(3.0), math.sqrt(2.0), math.sqrt(6.0)], dtype=torch.float64)[:, None]
    return m.to(dtype=dtype, device=device)


def _check_rgb(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise UserError(f"colorization needs RGB images (batch, 3, H, W), got shape {tuple(x.shape)}")


def decouple(x: torch.Tensor) -> torch.Tensor:
    """RGB (batch, 3, H, W) -> decoupled (gray, color1, color2) = M x per pixel."""
    _check_rgb(x)
    return torch.einsum("ij,bjhw->bihw", gray_color_basis(x.dtype, x.device), x)


def couple(y: torch.Tensor) -> torch.Tensor:
    """Decoupled -> RGB: M^T y per pixel (M is orthogonal)."""
    _check_rgb(y)
    return torch.einsum("ji,bjhw->bihw", gray_color_basis(y.dtype, y.device), y)


@torch.no_grad()
def colorize(sde: SDE, score_fn, gray: torch.Tensor, **inpaint_options) -> tuple[torch.Tensor, int]:
    """RGB images whose gray channel (R+G+B)/3 equals `gray` (batch, 1 or 3, H, W, model space); (samples, nfe)."""
    if gray.ndim != 4 or gray.shape[1] not in (1, 3):
        raise UserError(f"colorize needs gray images (batch, 1, H, W) or (batch, 3, H, W), got {tuple(gray.shape)}")
    rgb = gray.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    y0 = decouple(rgb)  # (sqrt(3) gray, 0, 0)
    mask = torch.zeros_like(y0)
    mask[:, 0] = 1.0

    def decoupled_score(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return decouple(score_fn(couple(y), t))

    y, used = inpaint(sde, decoupled_score, y0, mask, **inpaint_options)
    return couple(y), used


__all__ = ["check_mask", "inpaint", "gray_color_basis", "decouple", "couple", "colorize"]

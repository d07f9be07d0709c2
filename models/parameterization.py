"""Network parameterizations (score, eps, x0, v, edm) and their exact conversion to a score, for any linear SDE.

The sigma view (Karras et al., 2022, sec. 2-4): every SDE here has the kernel x_t = alpha(t) x0 + s(t) n with
n ~ N(0, I), alpha the mean coefficient and s the marginal std, i.e. x_t = alpha (x0 + sigma n) with
sigma = s / alpha and the scaled state x_hat = x_t / alpha = x0 + sigma n (VE: alpha = 1, sigma = s).
Tweedie's formula gives the score from the exact denoiser D = E[x0 | x_t] or noise E[n | x_t]:

    grad log p_t(x_t) = (alpha D - x_t) / s^2 = -(x_t - alpha D) / (alpha^2 sigma^2) = -E[n | x_t] / s.

Each parameterization names what the network output F estimates; the score follows from it exactly:
  eps  F = E[n | x_t]                     score = -F / s
  x0   F = E[x0 | x_t] = D                score = (alpha D - x_t) / s^2
  v    F = E[v | x_t], v = a n - b x0     with a = 1 / sqrt(1 + sigma^2), b = sigma a (VP: a = alpha, b = s;
       Salimans & Ho, 2022, generalised through the sigma view). With z = a x_hat = a x0 + b n and a^2 + b^2 = 1:
       E[n | x_t] = b z + a F, so score = -(b z + a F) / s.
  edm  D = c_skip x_hat + c_out F(c_in x_hat, c_noise)  (Karras et al., 2022, Table 1) with
       c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
       c_noise = ln(sigma) / 4, sd = model.sigma_data; score = (D - x_hat) / (alpha sigma^2).
`score` is the reference convention (the network output is -eps (VP, sub-VP) or the score (VE)); it is
handled by `get_score_fn` itself and is not converted here.
eps, x0 and v networks get x_t and the continuous noise labels of `noise_labels` (999 t for VP / sub-VP,
sigma(t) for VE), as the score networks do; edm networks get c_in x_hat and c_noise.
"""
from __future__ import annotations

import math

import torch

from errors import UserError

PARAMETERIZATIONS = ("score", "eps", "x0", "v", "edm")


def check_parameterization(parameterization: str, sigma_data: float = 0.5) -> str:
    """The lower-cased name if it is one of PARAMETERIZATIONS (and sigma_data > 0), else a UserError."""
    name = str(parameterization).lower()
    if name not in PARAMETERIZATIONS:
        raise UserError(f"unknown model.parameterization {parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}")
    if name == "edm" and not (math.isfinite(float(sigma_data)) and float(sigma_data) > 0):
        raise UserError(f"model.sigma_data must be a positive number, got {sigma_data}")
    return name


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) of Karras et al. (2022), Table 1, at noise levels sigma (batch,)."""
    sd2 = sigma_data ** 2
    total = sigma ** 2 + sd2
    return sd2 / total, sigma * sigma_data / torch.sqrt(total), 1.0 / torch.sqrt(total), torch.log(sigma) / 4.0


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.ndim - 1)).to(like.dtype)


def edm_network_input(x: torch.Tensor, alpha: torch.Tensor, std: torch.Tensor,
                      sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_in x_hat, c_noise): what an edm network gets for the state x_t = x at mean coefficient alpha, std s."""
    sigma = std / alpha
    _, _, c_in, c_noise = edm_preconditioning(sigma, sigma_data)
    return x * _col(c_in / alpha, x), c_noise


def output_to_score(parameterization: str, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor,
                    std: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """The score at x = x_t from a network output `out` under `parameterization` (module docstring equations).

    alpha, std: (batch,) mean coefficient and marginal std at each sample's t. Pure: no network, no SDE.
    """
    out = out.to(torch.promote_types(out.dtype, x.dtype))
    a_, s_ = _col(alpha, out), _col(std, out)
    if parameterization == "eps":
        return -out / s_
    if parameterization == "x0":
        return (a_ * out - x) / s_ ** 2
    sigma = s_ / a_
    x_hat = x / a_
    if parameterization == "v":
        a = 1.0 / torch.sqrt(1.0 + sigma ** 2)
        noise = sigma * a * (a * x_hat) + a * out  # E[n | x_t] = b z + a F
        return -noise / s_
    if parameterization == "edm":
        c_skip, c_out, _, _ = edm_preconditioning(sigma, sigma_data)
        denoised = c_skip * x_hat + c_out * out
        return (denoised - x_hat) / (a_ * sigma ** 2)
    raise UserError(f"output_to_score converts eps, x0, v and edm outputs, got {parameterization!r}")


__all__ = ["PARAMETERIZATIONS", "check_parameterization", "edm_preconditioning", "edm_network_input",
           "output_to_score"]

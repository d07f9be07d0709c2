"""Bits/dim of 8-bit images under a continuous model, with uniform dequantization (Song et al., 2021, Table 2).

Derivation. An image is k in {0, ..., 255}^D. Dequantize with u ~ U[0, 1)^D: x = (k + u) / 256 in [0, 1)^D;
the cells {(k + u)/256} tile [0, 1)^D, each of volume 256^-D. The model sees y = a x + b (the config's
data scaling, `data.transforms.data_scale`: (a, b) = (2, -1) for centered data, (1, 0) otherwise) and
gives a density p_y (here p_eps through the probability-flow ODE). By change of variables
p_x(x) = p_y(a x + b) a^D, and by Jensen's inequality the discrete model P(k) = int_cell p_x satisfies

    log P(k) >= E_u[log p_x((k + u)/256)] - D log 256
             = E_u[log p_y(y)] + D log a - D log 256.

So the reported bits/dim (an upper bound on the discrete negative log-likelihood) is

    bpd = -(E_u[log p_y(y)] + D log a - D log 256) / (D log 2)
        = -E_u[log p_y(y)] / (D log 2) + offset,      offset = 8 - log2(a),

i.e. offset = 7 for data centered to [-1, 1] and 8 for data in [0, 1]; this is the `offset` that the
reference implementation of Song et al. adds (there written 7 - inverse_scaler(-1)).

Several dequantization draws (`num_dequant`) are averaged per image in log-likelihood (the Monte Carlo
estimate of E_u[log p_y] above, as the paper repeats the evaluation with fresh noise and averages the
results); since bpd is affine in log p this is the same as averaging bits/dim. It is not the
importance-weighted log-mean-exp bound. Mean and standard error are taken over images.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from errors import UserError
from likelihood.ode import log_likelihood
from sde_lib.base import SDE, ScoreFn

NUM_LEVELS = 256  # 8-bit data


def bpd_offset(scale: float) -> float:
    """offset = 8 - log2(a): the 8-bit bin volume and the log-determinant of the scaling y = a x + b, in bits/dim."""
    if scale <= 0:
        raise UserError(f"data scale a must be positive, got {scale}")
    return math.log2(NUM_LEVELS) - math.log2(scale)


def logp_to_bpd(logp_model: torch.Tensor, num_dims: int, scale: float) -> torch.Tensor:
    """bpd = -(log p_y(y) + D log a - D log 256) / (D log 2) for a dequantized image y = a x + b."""
    return -logp_model / (num_dims * math.log(2.0)) + bpd_offset(scale)


def check_uint8_images(images) -> torch.Tensor:
    """Validate 8-bit images (batch, ...) with integer values in 0..255; return them as a uint8 tensor."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise UserError(f"images must be a tensor or numpy array, got {type(images).__name__}")
    if images.is_floating_point() or images.is_complex() or images.dtype == torch.bool:
        raise UserError(f"bits/dim needs raw 8-bit images (integer values 0..255, e.g. uint8), got dtype "
                        f"{images.dtype}; pass the images before scaling or dequantization")
    if images.ndim < 2 or images.shape[0] == 0:
        raise UserError(f"images must have shape (batch, ...) with batch >= 1, got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        low, high = int(images.min()), int(images.max())
        if low < 0 or high > NUM_LEVELS - 1:
            raise UserError(f"8-bit images must have values in 0..255, got range [{low}, {high}]")
        images = images.to(torch.uint8)
    return images


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform dequantization x = (k + u) / 256, u ~ U[0, 1), of uint8 images k: values in [0, 1)."""
    images = check_uint8_images(images)
    device = generator.device if generator is not None else images.device
    u = torch.rand(images.shape, generator=generator, device=device, dtype=dtype).to(images.device)
    return (images.to(dtype) + u) / NUM_LEVELS


@torch.no_grad()
def bits_per_dim(sde: SDE, score_fn: ScoreFn, images, data_scale: tuple[float, float] = (2.0, -1.0),
                 num_dequant: int = 1, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device=None,
                 **likelihood_options) -> tuple[torch.Tensor, int]:
    """Bits/dim per image (batch,) of uint8 `images` and the total NFE, averaging `num_dequant` draws.

    `data_scale` = (a, b) maps x in [0, 1] to the model input a x + b; `likelihood_options` go to
    `log_likelihood` (eps, method, rtol, atol, divergence, n_probes, ...); `generator` draws both the
    dequantization noise and the Hutchinson probes.
    """
    images = check_uint8_images(images)
    if int(num_dequant) < 1:
        raise UserError(f"num_dequant must be >= 1, got {num_dequant}")
    a, b = float(data_scale[0]), float(data_scale[1])
    bpd_offset(a)  # validates the scale before any work
    device = images.device if device is None else torch.device(device)
    images = images.to(device)
    num_dims = images[0].numel()
    total_logp = torch.zeros(images.shape[0], dtype=torch.float64, device=device)
    total_nfe = 0
    for _ in range(int(num_dequant)):
        y = a * dequantize(images, generator, dtype) + b
        logp, _, nfe = log_likelihood(sde, score_fn, y, generator=generator, **likelihood_options)
        total_logp += logp.to(torch.float64)
        total_nfe += nfe
    return logp_to_bpd(total_logp / int(num_dequant), num_dims, a), total_nfe


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for a single value)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() == 0:
        raise UserError("cannot average an empty set of values")
    if v.numel() == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(v.numel()))

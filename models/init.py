"""Weight initialization of the DDPM family: variance scaling, fan_avg, uniform (Ho et al., 2020)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def default_init_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Fill `weight` in place with U(-a, a), a = sqrt(3 scale / fan_avg); scale 0 means 1e-10 (near-zero init).

    Fans follow the (out, in, *kernel) layout: fan_in = in * prod(kernel), fan_out = out * prod(kernel).
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(weight.shape[2:]) if weight.ndim > 2 else 1
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    return weight.uniform_(-bound, bound)

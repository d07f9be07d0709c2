"""Interpolation through the probability-flow ODE's latent space (Song et al., 2021, sec. 4.3).

The PF-ODE maps data to latents deterministically (the same input gives the same latent on any run, for a
given score), and the map is invertible; interpolating latents spherically keeps them at the typical norm
of the Gaussian prior, so decoded frames stay on the data manifold (a straight line would shrink the norm).
"""
from __future__ import annotations

import torch

from errors import UserError
from solvers.ode import decode, encode


def slerp(z0: torch.Tensor, z1: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) of each pair of rows of z0, z1 at `alphas`: (len(alphas), *z0.shape).

    z(a) = sin((1-a) theta)/sin(theta) z0 + sin(a theta)/sin(theta) z1, theta = angle(z0, z1) per sample;
    linear interpolation where the angle is (numerically) zero.
    """
    if z0.shape != z1.shape:
        raise UserError(f"slerp needs latents of equal shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    a = alphas.to(z0).reshape(-1, *([1] * z0.ndim))
    flat0, flat1 = z0.reshape(z0.shape[0], -1), z1.reshape(z1.shape[0], -1)
    cos = (flat0 * flat1).sum(1) / (flat0.norm(dim=1) * flat1.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1.0, 1.0)).reshape(-1, *([1] * (z0.ndim - 1)))[None]
    small = theta.abs() < 1e-6
    sin = torch.where(small, torch.ones_like(theta), torch.sin(theta))
    w0 = torch.where(small, 1 - a, torch.sin((1 - a) * theta) / sin)
    w1 = torch.where(small, a, torch.sin(a * theta) / sin)
    return w0 * z0[None] + w1 * z1[None]


@torch.no_grad()
def interpolate(sde, score_fn, x_a: torch.Tensor, x_b: torch.Tensor, num_frames: int = 8, eps: float = 1e-3,
                **ode_options) -> tuple[torch.Tensor, int]:
    """Encode x_a, x_b (batch, ...) with the PF-ODE, slerp the latents, decode; returns (frames, nfe_used).

    frames has shape (num_frames, batch, ...); frames[0] and frames[-1] reconstruct x_a and x_b.
    """
    if x_a.shape != x_b.shape:
        raise UserError(f"interpolation needs two inputs of the same shape, got {tuple(x_a.shape)} and "
                        f"{tuple(x_b.shape)}")
    if int(num_frames) < 2:
        raise UserError(f"interpolation needs at least 2 frames, got {num_frames}")
    z, nfe_enc = encode(sde, score_fn, torch.cat([x_a, x_b]), eps=eps, **ode_options)
    z_a, z_b = z.chunk(2)
    alphas = torch.linspace(0.0, 1.0, int(num_frames), dtype=torch.float64)
    latents = slerp(z_a, z_b, alphas)
    frames, nfe_dec = decode(sde, score_fn, latents.reshape(-1, *x_a.shape[1:]), eps=eps, **ode_options)
    return frames.reshape(latents.shape), nfe_enc + nfe_dec


__all__ = ["slerp", "interpolate"]

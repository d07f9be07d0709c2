"""FIR up/down-sampling (Karras et al., 2020, StyleGAN2 "upfirdn"), in plain PyTorch ops.

upfirdn2d: upsample by zero insertion, pad, filter with a 2-D FIR kernel, keep every `down`-th
pixel. With the normalized binomial kernel [1, 3, 3, 1] it is the anti-aliased resampling that
NCSN++ uses (Song et al., 2021, app. H). All functions take NCHW tensors in any memory format.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.init import default_init_


def make_kernel(k: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """2-D kernel from a separable 1-D one (outer product), normalized to sum 1."""
    k = torch.as_tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = torch.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(k.shape)}")
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Zero-insertion upsampling by `up`, zero padding (before, after) on both axes, FIR filtering, decimation."""
    n, c, h, w = x.shape
    if up > 1:
        # place each pixel at the top-left of an up x up cell of zeros
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    kh, kw = kernel.shape
    # true convolution (flipped kernel), one filter per channel
    weight = kernel.flip(0, 1).to(dtype=x.dtype, device=x.device).expand(c, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Upsample by `factor` with the FIR kernel (gain factor^2 keeps constant images constant)."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * factor ** 2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Filter with the FIR kernel, then keep every `factor`-th pixel."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling (each pixel repeated factor x factor)."""
    return F.interpolate(x, scale_factor=factor, mode="nearest")


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Mean over factor x factor blocks."""
    return F.avg_pool2d(x, factor)


def upsample_conv_2d(x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Fused FIR upsampling + convolution: transposed conv with stride `factor`, then the FIR filter."""
    out_ch, in_ch, kh, kw = weight.shape
    # a transposed conv with the spatially flipped, in/out-swapped weight equals zero insertion + conv
    w = weight.flip(2, 3).transpose(0, 1)
    x = F.conv_transpose2d(x, w, stride=factor)
    p = (kernel.shape[0] - factor) - (kw - 1)
    return upfirdn2d(x, kernel * factor ** 2, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Fused FIR filtering + strided convolution (downsampling by `factor`)."""
    kw = weight.shape[-1]
    p = (kernel.shape[0] - factor) + (kw - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)


class FIRConv2d(nn.Module):
    """Convolution with optional fused FIR up- or down-sampling; parameters `weight` (out, in, k, k) and `bias`."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, up: bool = False, down: bool = False,
                 resample_kernel: Sequence[float] = (1, 3, 3, 1), use_bias: bool = True, init_scale: float = 1.0):
        super().__init__()
        if up and down:
            raise ValueError("FIRConv2d: up and down are exclusive")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"FIRConv2d: kernel size must be odd and >= 1, got {kernel}")
        self.weight = nn.Parameter(default_init_(torch.empty(out_ch, in_ch, kernel, kernel), init_scale))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if use_bias else None
        self.register_buffer("fir", make_kernel(resample_kernel), persistent=False)
        self.up, self.down, self.kernel = up, down, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.up:
            x = upsample_conv_2d(x, w, self.fir)
        elif self.down:
            x = conv_downsample_2d(x, w, self.fir)
        else:
            x = F.conv2d(x, w, padding=self.kernel // 2)
        if self.bias is not None:
            x = x + self.bias.reshape(1, -1, 1, 1).to(x.dtype)
        return x

"""Building blocks of the DDPM / DDPM++ / NCSN++ U-Nets (Ho et al., 2020; Song et al., 2021, app. H).

Sub-module and parameter names (GroupNorm_0, Conv_0, Dense_0, NIN_0, Conv2d_0, W, b, ...) follow the
reference implementation's so that its published checkpoints map onto these modules name by name.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError
from models import fir
from models.init import default_init_

SQRT2 = math.sqrt(2.0)
ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "elu": nn.ELU, "relu": nn.ReLU,
               "lrelu": lambda: nn.LeakyReLU(negative_slope=0.2)}


def get_act(config) -> nn.Module:
    """Activation named by config.model.nonlinearity."""
    name = str(config.model.get("nonlinearity", "swish")).lower()
    if name not in ACTIVATIONS:
        raise UserError(f"unknown model.nonlinearity {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = True, dilation: int = 1,
            init_scale: float = 1.0, padding: int = 1) -> nn.Conv2d:
    """3x3 convolution with DDPM initialization (variance scaling weights, zero bias)."""
    conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    default_init_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_ch: int, out_ch: int, stride: int = 1, bias: bool = True, init_scale: float = 1.0) -> nn.Conv2d:
    """1x1 convolution with DDPM initialization."""
    conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=bias)
    default_init_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def dense(in_dim: int, out_dim: int) -> nn.Linear:
    """Linear layer with DDPM initialization."""
    layer = nn.Linear(in_dim, out_dim)
    default_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int, groups: int | None = None) -> nn.GroupNorm:
    """GroupNorm with min(channels // 4, 32) groups (DDPM++/NCSN++) or a fixed count (DDPM: 32), eps 1e-6."""
    groups = min(channels // 4, 32) if groups is None else groups
    if groups < 1 or channels % groups:
        raise UserError(f"GroupNorm: {channels} channels cannot be split into {groups} groups; "
                        "choose model.nf so that every level's channel count divides evenly")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


class NIN(nn.Module):
    """Per-pixel linear map over channels ("network in network"); W is (in, out) as in DDPM."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(default_init_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y[n, o, h, w] = sum_c x[n, c, h, w] W[c, o] + b[o], as a 1x1 convolution
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels with a residual connection (DDPM; Song et al., 2021).

    out = (x + NIN_3(softmax(q k^T / sqrt(C)) v)) / (sqrt(2) if skip_rescale else 1).
    """

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0,
                 groups: int | None = None):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels, groups)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.GroupNorm_0(x)
        w = torch.cat([self.NIN_0.W, self.NIN_1.W, self.NIN_2.W], dim=1)
        bias = torch.cat([self.NIN_0.b, self.NIN_1.b, self.NIN_2.b])
        qkv = F.conv2d(h, w.t()[:, :, None, None], bias)  # q, k, v in one 1x1 convolution
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in qkv.chunk(3, dim=1))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C)
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        h = self.NIN_3(h)
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class Upsample(nn.Module):
    """x2 upsampling: nearest (+ 3x3 conv) or FIR (+ fused FIR conv)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir_on: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and not fir_on:
            self.Conv_0 = conv3x3(in_ch, out_ch)
        elif with_conv:
            self.Conv2d_0 = fir.FIRConv2d(in_ch, out_ch, 3, up=True, resample_kernel=fir_kernel)
        if not with_conv and out_ch != in_ch:
            raise ValueError("Upsample without a convolution cannot change the channel count")
        self.register_buffer("fir_kernel", fir.make_kernel(fir_kernel), persistent=False)
        self.fir, self.with_conv = fir_on, with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            h = fir.naive_upsample_2d(x)
            return self.Conv_0(h) if self.with_conv else h
        return self.Conv2d_0(x) if self.with_conv else fir.upsample_2d(x, self.fir_kernel)


class Downsample(nn.Module):
    """/2 downsampling: 'SAME'-padded stride-2 3x3 conv or 2x2 average (DDPM), or FIR (+ fused FIR conv)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir_on: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and not fir_on:
            self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)
        elif with_conv:
            self.Conv2d_0 = fir.FIRConv2d(in_ch, out_ch, 3, down=True, resample_kernel=fir_kernel)
        if not with_conv and out_ch != in_ch:
            raise ValueError("Downsample without a convolution cannot change the channel count")
        self.register_buffer("fir_kernel", fir.make_kernel(fir_kernel), persistent=False)
        self.fir, self.with_conv = fir_on, with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            if self.with_conv:
                return self.Conv_0(F.pad(x, (0, 1, 0, 1)))  # TensorFlow 'SAME' padding for stride 2
            return F.avg_pool2d(x, 2)
        return self.Conv2d_0(x) if self.with_conv else fir.downsample_2d(x, self.fir_kernel)


class ResnetBlockDDPM(nn.Module):
    """DDPM residual block: GN-act-conv, + Dense(act(temb)), GN-act-dropout-conv, NIN/conv shortcut.

    DDPM (Ho et al.) uses 32 groups, Conv_1 initialized near zero and no rescaling; DDPM++ uses
    min(C/4, 32) groups, init_scale for Conv_1 and the 1/sqrt(2) skip rescaling.
    """

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 conv_shortcut: bool = False, dropout: float = 0.1, skip_rescale: bool = False,
                 init_scale: float = 0.0, groups: int | None = None):
        super().__init__()
        out_ch = out_ch or in_ch
        # Registration order fixes the parameter order (and so an EMA's shadow list): forward order,
        # as in the reference's DDPM and DDPM++ blocks.
        self.GroupNorm_0 = group_norm(in_ch, groups)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch, groups)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.act, self.in_ch, self.out_ch = act, in_ch, out_ch
        self.conv_shortcut, self.skip_rescale = conv_shortcut, skip_rescale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-type residual block (Brock et al., 2019) with optional up/down-sampling in both branches."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.1, fir_on: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.resample_skip = in_ch != out_ch or up or down
        if self.resample_skip:
            self.Conv_2 = conv1x1(in_ch, out_ch)
        self.register_buffer("fir_kernel", fir.make_kernel(fir_kernel), persistent=False)
        self.act, self.up, self.down, self.fir = act, up, down, fir_on
        self.skip_rescale = skip_rescale

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return fir.upsample_2d(x, self.fir_kernel) if self.fir else fir.naive_upsample_2d(x)
        if self.down:
            return fir.downsample_2d(x, self.fir_kernel) if self.fir else fir.naive_downsample_2d(x)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._resample(self.act(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.resample_skip:
            x = self.Conv_2(x)
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class Combine(nn.Module):
    """Merge the input pyramid into the main path: 1x1 conv of x, then sum with or concatenate to y."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        if method not in ("cat", "sum"):
            raise UserError(f"unknown model.progressive_combine {method!r}; valid: cat, sum")
        self.Conv = conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y



"""NCSNv2 (Song & Ermon, 2020): RefineNet with dilated residual blocks, InstanceNorm++, output / sigma.

The network is not conditioned on the noise level; its output is divided by sigma (the "s(x)/sigma"
parameterization, technique 3 of that paper). Layout for images below 96 px (their CIFAR-10 model);
module names follow the reference implementation (begin_conv, res1..res4, refine1..refine4, ...).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError
from models import layers


def conv3x3(in_ch: int, out_ch: int, bias: bool = True, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution, 'same' padding for any dilation, PyTorch's default initialization."""
    return nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=bias)


class InstanceNormPlus(nn.Module):
    """InstanceNorm++ (Song & Ermon, 2019, app. A): instance norm that keeps the channel means' spread.

    h = gamma * (IN(x) + alpha * (mu_c - mean_c mu) / std_c mu) + beta, mu_c the spatial mean of channel c.
    """

    def __init__(self, num_features: int, bias: bool = True):
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.gamma = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.beta = nn.Parameter(torch.zeros(num_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in >= float32, float64 kept
        means = xf.mean(dim=(2, 3))  # (B, C)
        var = xf.var(dim=(2, 3), unbiased=False, keepdim=True)
        h = (xf - means[:, :, None, None]) / torch.sqrt(var + 1e-5)
        spread = (means - means.mean(dim=1, keepdim=True)) / torch.sqrt(means.var(dim=1, keepdim=True) + 1e-5)
        h = h + spread[:, :, None, None] * self.alpha[None, :, None, None]
        h = self.gamma[None, :, None, None] * h
        if self.beta is not None:
            h = h + self.beta[None, :, None, None]
        return h.to(x.dtype)


class ConvMeanPool(nn.Module):
    """Convolution followed by 2x2 mean pooling."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, adjust_padding: bool = False):
        super().__init__()
        conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        # for 28 px inputs one row/column of zeros keeps the sizes even
        self.conv = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), conv) if adjust_padding else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(x), 2)


class ResidualBlock(nn.Module):
    """Pre-activation residual block norm-act-conv-norm-act-conv; 'down' halves the size unless dilated."""

    def __init__(self, in_ch: int, out_ch: int, resample: str | None = None, act: nn.Module | None = None,
                 adjust_padding: bool = False, dilation: int = 1):
        super().__init__()
        self.act = act if act is not None else nn.ELU()
        self.in_ch, self.out_ch, self.resample = in_ch, out_ch, resample
        if resample == "down":
            self.conv1 = conv3x3(in_ch, in_ch, dilation=dilation)
            self.normalize2 = InstanceNormPlus(in_ch)
            if dilation > 1:  # dilation replaces the downsampling (Song & Ermon, 2020)
                self.conv2 = conv3x3(in_ch, out_ch, dilation=dilation)
                self.shortcut = conv3x3(in_ch, out_ch, dilation=dilation)
            else:
                self.conv2 = ConvMeanPool(in_ch, out_ch, 3, adjust_padding)
                self.shortcut = ConvMeanPool(in_ch, out_ch, 1, adjust_padding)
        elif resample is None:
            self.conv1 = conv3x3(in_ch, out_ch, dilation=dilation)
            self.normalize2 = InstanceNormPlus(out_ch)
            self.conv2 = conv3x3(out_ch, out_ch, dilation=dilation)
            if in_ch != out_ch:
                self.shortcut = conv3x3(in_ch, out_ch, dilation=dilation) if dilation > 1 else nn.Conv2d(
                    in_ch, out_ch, 1)
        else:
            raise ValueError(f"invalid resample {resample!r}")
        self.normalize1 = InstanceNormPlus(in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.normalize1(x)))
        h = self.conv2(self.act(self.normalize2(h)))
        skip = x if self.in_ch == self.out_ch and self.resample is None else self.shortcut(x)
        return skip + h


class RCUBlock(nn.Module):
    """Residual conv units of RefineNet (Lin et al., 2017): n_blocks x (n_stages x act-conv) + identity."""

    def __init__(self, features: int, n_blocks: int, n_stages: int, act: nn.Module):
        super().__init__()
        for i in range(n_blocks):
            for j in range(n_stages):
                setattr(self, f"{i + 1}_{j + 1}_conv", conv3x3(features, features, bias=False))
        self.n_blocks, self.n_stages, self.act = n_blocks, n_stages, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_blocks):
            residual = x
            for j in range(self.n_stages):
                x = getattr(self, f"{i + 1}_{j + 1}_conv")(self.act(x))
            x = x + residual
        return x


class CRPBlock(nn.Module):
    """Chained residual pooling: repeated 5x5 max-pool + conv, each result added to the input."""

    def __init__(self, features: int, n_stages: int, act: nn.Module):
        super().__init__()
        self.convs = nn.ModuleList(conv3x3(features, features, bias=False) for _ in range(n_stages))
        self.pool = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        path = x
        for conv in self.convs:
            path = conv(self.pool(path))
            x = path + x
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: conv each input, resize bilinearly to a common size, sum."""

    def __init__(self, in_planes: Sequence[int], features: int):
        super().__init__()
        self.convs = nn.ModuleList(conv3x3(c, features) for c in in_planes)

    def forward(self, xs: Sequence[torch.Tensor], shape) -> torch.Tensor:
        out = None
        for conv, x in zip(self.convs, xs):
            h = F.interpolate(conv(x), size=tuple(shape), mode="bilinear", align_corners=True)
            out = h if out is None else out + h
        return out


class RefineBlock(nn.Module):
    """RefineNet block: RCUs on each input, fusion, chained residual pooling, output RCUs."""

    def __init__(self, in_planes: Sequence[int], features: int, act: nn.Module, start: bool = False,
                 end: bool = False):
        super().__init__()
        self.adapt_convs = nn.ModuleList(RCUBlock(c, 2, 2, act) for c in in_planes)
        self.output_convs = RCUBlock(features, 3 if end else 1, 2, act)
        if not start:
            self.msf = MSFBlock(in_planes, features)
        self.crp = CRPBlock(features, 2, act)

    def forward(self, xs: Sequence[torch.Tensor], shape) -> torch.Tensor:
        hs = [adapt(x) for adapt, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, shape) if len(hs) > 1 else hs[0]
        return self.output_convs(self.crp(h))


class NCSNv2(nn.Module):
    """NCSNv2 score network for images below 96 px; `forward(x, sigma)` returns s_theta(x) / sigma."""

    def __init__(self, config):
        super().__init__()
        image_size = int(config.data.image_size)
        if image_size >= 96:
            raise UserError(f"ncsnv2 is implemented for images below 96 px, got data.image_size={image_size}")
        if image_size % 8 and image_size != 28:
            raise UserError(f"ncsnv2 needs data.image_size divisible by 8 (or 28), got {image_size}")
        self.centered = bool(config.data.centered)
        self.act = act = layers.get_act(config)
        nf = int(config.model.nf)
        channels = int(config.data.num_channels)
        self.begin_conv = nn.Conv2d(channels, nf, 3, padding=1)
        self.normalizer = InstanceNormPlus(nf)
        self.end_conv = nn.Conv2d(nf, channels, 3, padding=1)
        self.res1 = nn.ModuleList([ResidualBlock(nf, nf, act=act), ResidualBlock(nf, nf, act=act)])
        self.res2 = nn.ModuleList([ResidualBlock(nf, 2 * nf, "down", act=act),
                                   ResidualBlock(2 * nf, 2 * nf, act=act)])
        self.res3 = nn.ModuleList([ResidualBlock(2 * nf, 2 * nf, "down", act=act, dilation=2),
                                   ResidualBlock(2 * nf, 2 * nf, act=act, dilation=2)])
        self.res4 = nn.ModuleList([ResidualBlock(2 * nf, 2 * nf, "down", act=act, dilation=4,
                                                 adjust_padding=image_size == 28),
                                   ResidualBlock(2 * nf, 2 * nf, act=act, dilation=4)])
        self.refine1 = RefineBlock([2 * nf], 2 * nf, act, start=True)
        self.refine2 = RefineBlock([2 * nf, 2 * nf], 2 * nf, act)
        self.refine3 = RefineBlock([2 * nf, 2 * nf], nf, act)
        self.refine4 = RefineBlock([nf, nf], nf, act, end=True)

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Score estimate s_theta(x) / sigma (Song & Ermon, 2020, sec. 3.4)."""
        h = x if self.centered else 2 * x - 1.0
        layer1 = self._run(self.res1, self.begin_conv(h))
        layer2 = self._run(self.res2, layer1)
        layer3 = self._run(self.res3, layer2)
        layer4 = self._run(self.res4, layer3)
        ref1 = self.refine1([layer4], layer4.shape[2:])
        ref2 = self.refine2([layer3, ref1], layer3.shape[2:])
        ref3 = self.refine3([layer2, ref2], layer2.shape[2:])
        out = self.refine4([layer1, ref3], layer1.shape[2:])
        out = self.end_conv(self.act(self.normalizer(out)))
        return out / sigma.to(out.dtype).reshape(-1, *([1] * (out.ndim - 1)))

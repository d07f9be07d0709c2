"""NCSN++ and DDPM++ U-Nets (Song et al., 2021, app. H): one configurable network.

The modules live in one flat `all_modules` list, in the order the forward pass uses them, like the
reference implementation; its checkpoints therefore load by parameter name (after stripping
DataParallel's "module." prefix). Config keys read: see docs/MODELS.md.
"""
from __future__ import annotations

import functools
from typing import Iterator

import torch
from torch import nn

from errors import UserError
from models import layers
from models.embeddings import (GaussianFourierProjection, class_embedding, class_label_tensor, positional_timesteps,
                               resolve_embedding_type, sinusoidal_embedding)
from models.layers import SQRT2, conv3x3, dense, group_norm

PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
RESBLOCKS = ("ddpm", "biggan")


def _choice(config, key: str, valid: tuple[str, ...]) -> str:
    value = str(config.model.get(key)).lower()
    if value not in valid:
        raise UserError(f"unknown model.{key} {value!r}; valid: {', '.join(valid)}")
    return value


def level_resolutions(image_size: int, num_levels: int) -> list[int]:
    """Feature-map size at each U-Net level; the image must halve cleanly num_levels - 1 times."""
    if num_levels < 1 or image_size % (2 ** (num_levels - 1)):
        raise UserError(f"data.image_size={image_size} cannot be halved {num_levels - 1} times "
                        f"(len(model.ch_mult)={num_levels})")
    return [image_size // 2 ** i for i in range(num_levels)]


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ score network; `forward(x, labels)` with labels = sigma (VE) or 999 t / index (VP)."""

    def __init__(self, config, norm_groups: int | None = None):
        super().__init__()
        m = config.model
        self.act = act = layers.get_act(config)
        self.nf = nf = int(m.nf)
        ch_mult = tuple(int(c) for c in m.ch_mult)
        self.num_res_blocks = nrb = int(m.num_res_blocks)
        self.attn_resolutions = tuple(int(r) for r in m.attn_resolutions)
        self.num_resolutions = levels = len(ch_mult)
        self.all_resolutions = level_resolutions(int(config.data.image_size), levels)
        self.attn_levels = [r in self.attn_resolutions for r in self.all_resolutions]
        self.conditional = bool(m.conditional)
        self.centered = bool(config.data.centered)
        self.scale_by_sigma = bool(m.scale_by_sigma)
        self.skip_rescale = skip_rescale = bool(m.skip_rescale)
        self.resblock_type = _choice(config, "resblock_type", RESBLOCKS)
        self.progressive = _choice(config, "progressive", PROGRESSIVE)
        self.progressive_input = _choice(config, "progressive_input", PROGRESSIVE_INPUT)
        self.embedding_type = resolve_embedding_type(config)
        self.config = config
        fir_on, fir_kernel = bool(m.fir), tuple(m.fir_kernel)
        init_scale, dropout = float(m.init_scale), float(m.dropout)
        combine_method = str(m.progressive_combine).lower()
        channels = int(config.data.num_channels)

        modules: list[nn.Module] = []
        if self.embedding_type == "fourier":
            modules.append(GaussianFourierProjection(embedding_size=nf, scale=float(m.fourier_scale)))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if self.conditional:
            modules += [dense(embed_dim, 4 * nf), dense(4 * nf, 4 * nf)]
        temb_dim = 4 * nf if self.conditional else None

        norm = functools.partial(group_norm, groups=norm_groups)  # None: min(C // 4, 32) groups
        attn = functools.partial(layers.AttnBlock, init_scale=init_scale, skip_rescale=skip_rescale,
                                 groups=norm_groups)
        upsample = functools.partial(layers.Upsample, with_conv=bool(m.resamp_with_conv), fir_on=fir_on,
                                     fir_kernel=fir_kernel)
        downsample = functools.partial(layers.Downsample, with_conv=bool(m.resamp_with_conv), fir_on=fir_on,
                                       fir_kernel=fir_kernel)
        # the pyramids resample without a convolution for *_skip, with one for "residual"
        pyramid_up = functools.partial(layers.Upsample, fir_on=fir_on, fir_kernel=fir_kernel,
                                       with_conv=self.progressive == "residual")
        pyramid_down = functools.partial(layers.Downsample, fir_on=fir_on, fir_kernel=fir_kernel,
                                         with_conv=self.progressive_input == "residual")
        if self.resblock_type == "ddpm":
            resblock = functools.partial(layers.ResnetBlockDDPM, act=act, dropout=dropout, init_scale=init_scale,
                                         skip_rescale=skip_rescale, temb_dim=temb_dim, groups=norm_groups)
        else:
            resblock = functools.partial(layers.ResnetBlockBigGAN, act=act, dropout=dropout, fir_on=fir_on,
                                         fir_kernel=fir_kernel, init_scale=init_scale,
                                         skip_rescale=skip_rescale, temb_dim=temb_dim)

        # --- downsampling path ---
        input_pyramid_ch = channels
        modules.append(conv3x3(channels, nf))
        hs_c = [nf]
        in_ch = nf
        for level in range(levels):
            for _ in range(nrb):
                out_ch = nf * ch_mult[level]
                modules.append(resblock(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self.attn_levels[level]:
                    modules.append(attn(channels=in_ch))
                hs_c.append(in_ch)
            if level != levels - 1:
                if self.resblock_type == "ddpm":
                    modules.append(downsample(in_ch=in_ch))
                else:
                    modules.append(resblock(down=True, in_ch=in_ch))
                if self.progressive_input == "input_skip":
                    modules.append(pyramid_down(in_ch=input_pyramid_ch))
                    modules.append(layers.Combine(dim1=input_pyramid_ch, dim2=in_ch, method=combine_method))
                    if combine_method == "cat":
                        in_ch *= 2
                elif self.progressive_input == "residual":
                    modules.append(pyramid_down(in_ch=input_pyramid_ch, out_ch=in_ch))
                    input_pyramid_ch = in_ch
                hs_c.append(in_ch)

        # --- bottleneck ---
        in_ch = hs_c[-1]
        modules += [resblock(in_ch=in_ch), attn(channels=in_ch), resblock(in_ch=in_ch)]

        # --- upsampling path ---
        pyramid_ch = 0
        for level in reversed(range(levels)):
            for _ in range(nrb + 1):
                out_ch = nf * ch_mult[level]
                modules.append(resblock(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self.attn_levels[level]:
                modules.append(attn(channels=in_ch))
            if self.progressive != "none":
                if level == levels - 1:
                    modules.append(norm(in_ch))
                    if self.progressive == "output_skip":
                        modules.append(conv3x3(in_ch, channels, init_scale=init_scale))
                        pyramid_ch = channels
                    else:
                        modules.append(conv3x3(in_ch, in_ch, bias=True))
                        pyramid_ch = in_ch
                elif self.progressive == "output_skip":
                    modules.append(pyramid_up(in_ch=pyramid_ch))
                    modules.append(norm(in_ch))
                    modules.append(conv3x3(in_ch, channels, bias=True, init_scale=init_scale))
                    pyramid_ch = channels
                else:
                    modules.append(pyramid_up(in_ch=pyramid_ch, out_ch=in_ch))
                    pyramid_ch = in_ch
            if level != 0:
                if self.resblock_type == "ddpm":
                    modules.append(upsample(in_ch=in_ch))
                else:
                    modules.append(resblock(in_ch=in_ch, up=True))
        assert not hs_c
        if self.progressive != "output_skip":
            modules += [norm(in_ch), conv3x3(in_ch, channels, init_scale=init_scale)]
        self.all_modules = nn.ModuleList(modules)
        # Class conditioning (data.num_classes = K > 0): an embedding with a null row K, added to the time
        # embedding. Kept outside all_modules so unconditional networks keep the reference's parameter names.
        self.num_classes = int(config.data.get("num_classes", 0))
        if self.num_classes > 0:
            if not self.conditional:
                raise UserError("data.num_classes > 0 needs a time-conditional U-Net (model.conditional=true): "
                                "the class embedding is added to the time embedding")
            self.class_embed = class_embedding(self.num_classes, 4 * nf)

    def _block(self, it: Iterator[nn.Module], h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """Apply the next resampling module: a BigGAN block (takes temb) or a plain Up/Downsample."""
        module = next(it)
        return module(h) if self.resblock_type == "ddpm" else module(h, temb)

    def _merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a + b) / SQRT2 if self.skip_rescale else a + b

    def forward(self, x: torch.Tensor, labels: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Network output (a score for VE with scale_by_sigma, a noise prediction for VP) of x's shape.

        `class_labels` (batch,) are used by class-conditional networks only; None means the null class.
        """
        it = iter(self.all_modules)
        if self.embedding_type == "fourier":
            temb = next(it)(torch.log(labels))  # Fourier features of log sigma
        else:
            temb = sinusoidal_embedding(positional_timesteps(labels, self.config), self.nf)
        if self.conditional:
            temb = next(it)(temb.to(x.dtype))
            temb = next(it)(self.act(temb))
            if self.num_classes > 0:
                temb = temb + self.class_embed(class_label_tensor(class_labels, x, self.num_classes)).to(temb.dtype)
        else:
            temb = None

        h = x if self.centered else 2 * x - 1.0  # data in [0, 1] -> [-1, 1]
        input_pyramid = h if self.progressive_input != "none" else None
        hs = [next(it)(h)]
        for level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(it)(hs[-1], temb)
                if self.attn_levels[level]:
                    h = next(it)(h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                h = self._block(it, hs[-1], temb)
                if self.progressive_input == "input_skip":
                    input_pyramid = next(it)(input_pyramid)
                    h = next(it)(input_pyramid, h)
                elif self.progressive_input == "residual":
                    input_pyramid = self._merge(next(it)(input_pyramid), h)
                    h = input_pyramid
                hs.append(h)

        h = next(it)(hs[-1], temb)
        h = next(it)(h)
        h = next(it)(h, temb)

        pyramid = None
        for level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(it)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn_levels[level]:
                h = next(it)(h)
            if self.progressive != "none":
                if level == self.num_resolutions - 1:
                    pyramid = self.act(next(it)(h))
                    pyramid = next(it)(pyramid)
                elif self.progressive == "output_skip":
                    pyramid = next(it)(pyramid)
                    norm, conv = next(it), next(it)
                    pyramid = pyramid + conv(self.act(norm(h)))
                else:
                    pyramid = self._merge(next(it)(pyramid), h)
                    h = pyramid
            if level != 0:
                h = self._block(it, h, temb)
        assert not hs

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = self.act(next(it)(h))
            h = next(it)(h)
        assert next(it, None) is None, "module list and forward pass out of step"
        if self.scale_by_sigma:
            h = h / labels.to(h.dtype).reshape(-1, *([1] * (h.ndim - 1)))
        return h


class DDPMpp(NCSNpp):
    """DDPM++: the same network with DDPM++ settings (positional embedding, no FIR, no progressive paths)."""

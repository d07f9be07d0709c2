"""Embeddings of the noise-level input: sinusoidal (DDPM) and Gaussian random Fourier features (NCSN++)."""
from __future__ import annotations

import math

import torch
from torch import nn


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32: noise labels such as 999 t lose too much precision in half types."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Transformer position encoding of (batch,) labels, as DDPM uses (Ho et al., 2020, sec. 4 / Vaswani et al.).

    emb[:, k] = sin(t * w_k), emb[:, half + k] = cos(t * w_k), w_k = max_positions^(-k / (half - 1)).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a (batch,) tensor, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    dtype = _float_dtype(timesteps)
    scale = math.log(max_positions) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=timesteps.device, dtype=dtype) * -scale)
    args = timesteps.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features [sin(2 pi W s), cos(2 pi W s)], W ~ N(0, scale^2) fixed (Tancik et al., 2020).

    Song et al. (2021, app. H) feed log(sigma) through these for continuous-time VE models.
    """

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        # A fixed (non-trained) parameter, as in the reference implementation, so checkpoints carry it.
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        dtype = _float_dtype(s)
        proj = s.to(dtype)[:, None] * self.W.to(dtype)[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def resolve_embedding_type(config) -> str:
    """config.model.embedding_type, with "auto" meaning "fourier" for the VE SDE and "positional" otherwise.

    An edm network's label is c_noise = ln(sigma) / 4, which can be negative: "auto" is "positional" there
    (as in Karras et al.'s DDPM++), and "fourier" (which embeds log(label)) is refused.
    """
    from errors import UserError

    kind = str(config.model.get("embedding_type", "auto")).lower()
    edm = str(config.model.get("parameterization", "score")).lower() == "edm"
    if kind == "auto":
        return "fourier" if str(config.sde.name).lower() == "vesde" and not edm else "positional"
    if kind not in ("fourier", "positional"):
        raise UserError(f"unknown model.embedding_type {kind!r}; valid: auto, fourier, positional")
    if kind == "fourier" and edm:
        raise UserError("model.embedding_type='fourier' embeds log(label), but edm labels are ln(sigma)/4 "
                        "(may be negative); use embedding_type='positional' or 'auto'")
    return kind


def positional_timesteps(labels: torch.Tensor, config) -> torch.Tensor:
    """The value a positional embedding encodes for a network label.

    VP / sub-VP labels (999 t or a step index) are used as they are. VE labels are noise levels sigma;
    they are mapped to the reference's step index i = (N - 1) log(sigma_max / sigma) / log(sigma_max / sigma_min)
    (i = 0 at sigma_max), so that discrete-VE networks see the same numbers as in Song et al.'s code.
    """
    if str(config.sde.name).lower() != "vesde" or str(config.model.get("parameterization", "score")).lower() == "edm":
        return labels  # edm labels are c_noise = ln(sigma) / 4, embedded as they are
    smin, smax, n = float(config.sde.sigma_min), float(config.sde.sigma_max), int(config.sde.num_scales)
    dtype = _float_dtype(labels)
    return (n - 1) * torch.log(smax / labels.to(dtype)) / math.log(smax / smin)


def class_embedding(num_classes: int, dim: int) -> nn.Embedding:
    """Learned class embedding with num_classes + 1 rows (the last one is the null class), zero at init.

    Zero initialization makes a fresh conditional network compute the same function as an unconditional one.
    """
    embed = nn.Embedding(num_classes + 1, dim)
    nn.init.zeros_(embed.weight)
    return embed


def class_label_tensor(class_labels: torch.Tensor | None, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(batch,) long class labels on x's device; None means the null class num_classes for the whole batch."""
    if class_labels is None:
        return torch.full((x.shape[0],), num_classes, dtype=torch.long, device=x.device)
    labels = torch.as_tensor(class_labels, device=x.device).long()
    if labels.shape != (x.shape[0],):
        raise ValueError(f"class labels must be a (batch,) tensor with batch {x.shape[0]}, got {tuple(labels.shape)}")
    return labels

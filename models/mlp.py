"""MLP score network for low-dimensional data, conditioned on the noise level through an embedding."""
from __future__ import annotations

import torch
from torch import nn

from errors import UserError
from models.embeddings import (GaussianFourierProjection, class_embedding, class_label_tensor, positional_timesteps,
                               resolve_embedding_type, sinusoidal_embedding)


class MLPScoreNet(nn.Module):
    """x (batch, dim) and a noise label (batch,) -> (batch, dim).

    The label is what `get_score_fn` passes: 999 t or a step index (VP, sub-VP), or sigma (VE).
    "positional" embeds the label with sinusoids; "fourier" embeds log(label) with Gaussian Fourier
    features (the NCSN++ choice for sigma). Each hidden layer adds a learned projection of the embedding.
    With model.scale_by_sigma the output is divided by the label (sigma), as NCSN++ does.
    With data.num_classes = K > 0 a learned class embedding (K + 1 rows, row K = the null class) is added to
    the time embedding; unconditional networks (K = 0) have no such parameters.
    """

    def __init__(self, config):
        super().__init__()
        m = config.model
        self.dim = int(config.data.dim)
        hidden, layers, emb = int(m.hidden_dim), int(m.num_layers), int(m.embedding_dim)
        if self.dim < 1 or hidden < 1 or layers < 1 or emb < 2:
            raise UserError(f"MLP needs data.dim, model.hidden_dim, model.num_layers >= 1 and "
                            f"model.embedding_dim >= 2; got {self.dim}, {hidden}, {layers}, {emb}")
        self.embedding_type = resolve_embedding_type(config)
        self.config = config  # positional_timesteps reads the SDE's settings
        self.embedding_dim = emb
        self.scale_by_sigma = bool(m.scale_by_sigma)
        if self.embedding_type == "fourier":
            self.fourier = GaussianFourierProjection(emb // 2, scale=float(m.get("fourier_scale", 16.0)))
            emb = 2 * (emb // 2)
        self.embed = nn.Sequential(nn.Linear(emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.input = nn.Linear(self.dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.time_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(float(m.get("dropout", 0.0)))
        self.output = nn.Linear(hidden, self.dim)
        self.num_classes = int(config.data.get("num_classes", 0))
        if self.num_classes > 0:
            self.class_embed = class_embedding(self.num_classes, hidden)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Network output for inputs x (batch, dim) at noise labels cond (batch,) (and class labels, None = null)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"MLP score network expects inputs of shape (batch, {self.dim}), got {tuple(x.shape)}")
        if self.embedding_type == "fourier":
            temb = self.fourier(torch.log(cond))
        else:  # VE labels are sigmas: embedded as the step index, as NCSN++ does (raw sigma barely varies)
            temb = sinusoidal_embedding(positional_timesteps(cond, self.config), self.embedding_dim)
        temb = self.embed(temb.to(x.dtype))
        if self.num_classes > 0:
            temb = temb + self.class_embed(class_label_tensor(class_labels, x, self.num_classes)).to(temb.dtype)
        temb = self.act(temb)
        h = self.input(x)
        for layer, proj in zip(self.hidden, self.time_proj):
            # residual block: h <- h + W act(h + P temb)
            h = h + self.dropout(layer(self.act(h + proj(temb))))
        out = self.output(self.act(h))
        if self.scale_by_sigma:
            out = out / cond.to(out.dtype).reshape(-1, 1)
        return out

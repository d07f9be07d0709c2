"""Exact class-conditional ingredients of a Gaussian mixture whose components are the classes.

Class k is component k; the null label K (= num_components) means the whole mixture. Under any linear SDE,
p_t(x | k) is component k pushed through the SDE and p_t(k | x) is the component posterior, both in closed
form, so guidance (solvers/guidance.py) can be checked against exact answers.
"""
from __future__ import annotations

import torch

from data.mixtures import GaussianMixture
from sde_lib import SDE


def mixture_class_score_fn(mixture: GaussianMixture, sde: SDE):
    """class_score_fn(x, t, y): exact grad_x log p_t(x | y); y = K gives the unconditional mixture score."""
    k_total = mixture.num_components
    components = [mixture.component(k) for k in range(k_total)]

    def class_score_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for label in torch.unique(y).tolist():
            rows = y == label
            source = mixture if label == k_total else components[label]
            out[rows] = source.marginal_score(x[rows], t[rows], sde)
        return out
    return class_score_fn


def mixture_log_posterior_fn(mixture: GaussianMixture, sde: SDE):
    """log_prob_fn(x, t) = log p_t(k | x) for every component k: (batch, K), differentiable in x."""
    def log_prob_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log(mixture.component_posterior(x, t, sde))
    return log_prob_fn

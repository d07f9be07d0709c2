"""Guidance as a change of the score: classifier-free and classifier guidance (any sampler can use them).

Why here and network-agnostic: every guided sampler is an ordinary sampler run on a modified `score_fn(x, t)`.
The functions below take a *class-conditional* score `class_score_fn(x, t, y)` (y: (batch,) long labels, the
null label `num_classes` meaning "no class") or a plain score plus a classifier's log-probabilities, and return
a plain `score_fn(x, t)`. A network (models/guidance.py) or an exact mixture (data/class_conditional.py) can
provide the ingredients; the samplers in `solvers/` are used unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch

from errors import UserError
from sde_lib import batch_time

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ClassScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LogProbFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> (batch, num_classes) log p_t(c | x)


def batch_labels(y: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Class labels as a (batch,) long tensor on x's device (an int is repeated over the batch)."""
    y = torch.as_tensor(y, device=x.device, dtype=torch.long)
    if y.ndim == 0:
        y = y.expand(x.shape[0])
    if y.shape != (x.shape[0],):
        raise UserError(f"class labels must be an int or a (batch,) tensor with batch {x.shape[0]}, "
                        f"got shape {tuple(y.shape)}")
    return y


def check_class_label(label: int, num_classes: int) -> int:
    """`label` if 0 <= label < num_classes, else a UserError naming the valid range."""
    if num_classes <= 0:
        raise UserError("this model is unconditional (data.num_classes = 0): it takes no class label")
    if not 0 <= int(label) < num_classes:
        raise UserError(f"class label {label} is out of range: valid labels are 0..{num_classes - 1}")
    return int(label)


def conditional_score(class_score_fn: ClassScoreFn, y: int | torch.Tensor) -> ScoreFn:
    """s(x, t, y) with the labels fixed: a plain score_fn (one network call per evaluation)."""
    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return class_score_fn(x, batch_time(t, x), batch_labels(y, x))
    return score_fn


def classifier_free_guidance(class_score_fn: ClassScoreFn, y: int | torch.Tensor, null_label: int,
                             scale: float) -> ScoreFn:
    """score = w s(x, t, y) + (1 - w) s(x, t, null) (Bishop & Bishop 2024, eq. 20.60; Ho & Salimans 2022).

    w = `scale`: 0 gives the unconditional score, 1 the conditional one, w > 1 sharpens the class.
    Both terms come from ONE call of `class_score_fn` on the batch stacked twice ([x; x], labels [y; null]).
    """
    w = float(scale)

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = batch_time(t, x)
        labels = batch_labels(y, x)
        null = torch.full_like(labels, int(null_label))
        both = class_score_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        s_cond, s_uncond = both.chunk(2)
        return w * s_cond + (1.0 - w) * s_uncond
    return score_fn


def class_log_prob_gradient(log_prob_fn: LogProbFn, x: torch.Tensor, t: torch.Tensor,
                            y: torch.Tensor) -> torch.Tensor:
    """grad_x log p_t(y | x) per sample, by autograd through `log_prob_fn` (works inside torch.no_grad)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        log_probs = log_prob_fn(xg, t)
        if log_probs.ndim != 2 or log_probs.shape[0] != x.shape[0]:
            raise UserError(f"classifier must return (batch, num_classes) log-probabilities, got {tuple(log_probs.shape)}")
        if int(y.max()) >= log_probs.shape[1] or int(y.min()) < 0:
            raise UserError(f"class label out of range for a classifier with {log_probs.shape[1]} classes")
        selected = log_probs.gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(selected, xg)
    return grad.to(x.dtype)


def classifier_guidance(score_fn: ScoreFn, log_prob_fn: LogProbFn, y: int | torch.Tensor, scale: float) -> ScoreFn:
    """score = s(x, t) + lambda grad_x log p_t(y | x) (Bishop & Bishop 2024, eq. 20.59; Dhariwal & Nichol 2021).

    With the exact p_t(y | x) and lambda = 1 this is exactly the score of p_t(x | y) (Bayes' rule).
    """
    lam = float(scale)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = batch_time(t, x)
        return score_fn(x, t) + lam * class_log_prob_gradient(log_prob_fn, x, t, batch_labels(y, x))
    return guided


__all__ = ["batch_labels", "check_class_label", "conditional_score", "classifier_free_guidance",
           "class_log_prob_gradient", "classifier_guidance"]

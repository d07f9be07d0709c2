"""Network-level parts of guidance: a class-conditional score from a network, and a noise-conditional classifier.

Split from `solvers/guidance.py` because these know about networks and the score conventions of `get_score_fn`,
while the guidance formulas themselves only need `class_score_fn(x, t, y)` / `log_prob_fn(x, t)` callables (so
exact mixtures can stand in for networks in tests).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from errors import UserError
from models.embeddings import sinusoidal_embedding
from models.score_fn import get_score_fn
from sde_lib import SDE


def _call_with_classes(model: nn.Module, class_labels: torch.Tensor, x: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    return model(x, labels, class_labels=class_labels)


def model_num_classes(model: nn.Module) -> int:
    """data.num_classes of a network, also through DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and not hasattr(model, "num_classes"):
            model = getattr(model, attr)
    return int(getattr(model, "num_classes", 0))


def conditional_score_fn(sde: SDE, model: nn.Module, continuous: bool = True, parameterization: str = "score",
                         sigma_data: float = 0.5):
    """class_score_fn(x, t, y) of a class-conditional network: `get_score_fn` with the class labels y passed on.

    y is a (batch,) long tensor; the null label data.num_classes gives the unconditional score.
    `parameterization` / `sigma_data` as in `get_score_fn` (`models.score_fn_options(config)`).
    """
    if model_num_classes(model) <= 0:
        raise UserError("the model is unconditional (data.num_classes = 0); class labels and classifier-free "
                        "guidance need a class-conditional model (e.g. the *_cond configs)")

    def class_score_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bound = functools.partial(_call_with_classes, model, y)
        return get_score_fn(sde, bound, continuous, parameterization, sigma_data)(x, t)
    return class_score_fn


class NoiseConditionalClassifier(nn.Module):
    """p_t(c | x(t)): an MLP on the flattened input and a sinusoidal embedding of 999 t -> class logits.

    Small by design (toys, 8x8 digits); trained on data perturbed by the model's SDE (training/classifier.py).
    """

    def __init__(self, input_dim: int, num_classes: int, hidden_dim: int = 256, num_layers: int = 3,
                 embedding_dim: int = 64):
        super().__init__()
        if input_dim < 1 or num_classes < 2 or hidden_dim < 1 or num_layers < 1 or embedding_dim < 2:
            raise UserError(f"classifier needs input_dim >= 1, num_classes >= 2, hidden_dim, num_layers >= 1 and "
                            f"embedding_dim >= 2; got {input_dim}, {num_classes}, {hidden_dim}, {num_layers}, "
                            f"{embedding_dim}")
        self.input_dim, self.num_classes, self.embedding_dim = input_dim, num_classes, embedding_dim
        self.embed = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.input = nn.Linear(input_dim, hidden_dim)
        self.blocks = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_layers))
        self.act = nn.SiLU()
        self.output = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_classes) for x (batch, ...) at continuous times t (batch,) in [0, 1]."""
        flat = x.reshape(x.shape[0], -1).to(self.input.weight.dtype)
        if flat.shape[1] != self.input_dim:
            raise UserError(f"classifier expects {self.input_dim} input values per sample, got {flat.shape[1]}")
        temb = self.act(self.embed(sinusoidal_embedding(t * 999.0, self.embedding_dim).to(flat.dtype)))
        h = self.input(flat)
        for block in self.blocks:
            h = h + block(self.act(h + temb))
        return self.output(self.act(h))


def create_classifier(config) -> NoiseConditionalClassifier:
    """The classifier config.classifier describes, for config.data's input size and the data set's classes.

    The class count is the data set's (mixture components, 10 for digits / CIFAR-10), so a classifier can
    guide an unconditional model (data.num_classes = 0).
    """
    from data.loaders import dataset_num_classes

    num_classes = dataset_num_classes(config)
    if num_classes < 2:
        raise UserError(f"data set {config.data.dataset!r} has no class labels; a classifier needs a labelled set "
                        "(the toy mixtures, digits, cifar10)")
    if str(config.data.kind) == "image":
        input_dim = int(config.data.num_channels) * int(config.data.image_size) ** 2
    else:
        input_dim = int(config.data.dim)
    c = config.classifier
    return NoiseConditionalClassifier(input_dim, num_classes, int(c.hidden_dim), int(c.num_layers),
                                      int(c.embedding_dim))


def classifier_log_prob_fn(classifier: nn.Module):
    """log_prob_fn(x, t) = log_softmax(classifier(x, t)): log p_t(c | x) for every class, (batch, C)."""
    def log_prob_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(classifier(x, t).to(x.dtype), dim=1)
    return log_prob_fn


__all__ = ["model_num_classes", "conditional_score_fn", "NoiseConditionalClassifier", "create_classifier", "classifier_log_prob_fn"]

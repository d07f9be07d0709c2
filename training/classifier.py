"""Training of the noise-conditional classifier p_t(c | x(t)) for classifier guidance (`--mode train_classifier`).

The classifier sees data perturbed by the model's own SDE at t ~ U[eps, T], the time sampling of the DSM loss,
so grad_x log p_t(c | x) is the term of eq. 20.59 (Bishop & Bishop 2024) at every time a sampler visits.
Weights go to `{workdir}/classifier.pt` (state dict, step, config), next to the score model's checkpoints.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from atomic_io import write_json
from data.loaders import get_data_stream, step_generator
from errors import UserError
from models.guidance import create_classifier
from sde_lib import SDE, broadcast_to, get_sde
from training.checkpoint import read_verified, save_checkpoint
from training.device import get_device
from validation import check_output_files, check_settings

CLASSIFIER_FILE = "classifier.pt"
_SALT_CLASSIFIER = 0xC1A5


def classifier_path(workdir: str) -> str:
    """Where the classifier of a run is saved."""
    return os.path.join(workdir, CLASSIFIER_FILE)


def perturb(sde: SDE, x0: torch.Tensor, eps: float, generator: torch.Generator | None = None):
    """(x(t), t) with t ~ U[eps, T] and x(t) ~ p_0t(x(t) | x0) = N(alpha(t) x0, std(t)^2 I)."""
    u = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float32).to(x0.dtype)
    t = eps + (sde.T - eps) * u
    mean, std = sde.marginal_prob(x0, t)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return mean + broadcast_to(std, x0) * z, t


def classifier_loss(classifier: nn.Module, sde: SDE, x0: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of the classifier on perturbed data: E_t E_x(t) [-log p_t(c | x(t))]."""
    x_t, t = perturb(sde, x0, eps, generator)
    return nn.functional.cross_entropy(classifier(x_t, t), labels)


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, sde: SDE, x0: torch.Tensor, labels: torch.Tensor, t: float,
                        generator: torch.Generator | None = None) -> float:
    """Fraction of x(t) (at one fixed t) classified correctly."""
    mean, std = sde.marginal_prob(x0, torch.full((x0.shape[0],), t, device=x0.device, dtype=x0.dtype))
    x_t = mean + broadcast_to(std, x0) * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    logits = classifier(x_t, torch.full((x0.shape[0],), t, device=x0.device, dtype=x0.dtype))
    return float((logits.argmax(1) == labels).float().mean())


def train_classifier(config, workdir: str, *, n_iters: int | None = None, progress: bool = False) -> dict:
    """Train the classifier config.classifier describes on config.data; save it and return a summary dict."""
    c = config.classifier
    n_iters = int(c.n_iters) if n_iters is None else int(n_iters)
    if n_iters <= 0 or int(c.batch_size) <= 0 or float(c.lr) <= 0:
        raise UserError(f"classifier.n_iters, batch_size and lr must be positive; got {n_iters}, {c.batch_size}, {c.lr}")
    path = classifier_path(workdir)
    if os.path.exists(path):  # never replace a trained classifier (guided samples were drawn with it)
        raise UserError(f"{path} exists (a trained classifier); delete it, or use another --workdir, to train a new one")
    device = get_device(config)
    sde = get_sde(config)
    with torch.random.fork_rng(devices=[]):  # the same initial weights for the same config.seed (once: unseeded)
        torch.manual_seed(int(config.seed) ^ _SALT_CLASSIFIER)
        classifier = create_classifier(config)
    classifier = classifier.to(device)
    stream = get_data_stream(config, int(c.batch_size), device=device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=float(c.lr))
    eps, log_every = float(c.eps), max(int(c.log_every), 1)
    start, running = time.perf_counter(), []
    classifier.train()
    for step in range(n_iters):
        x0, labels = stream.labelled_batch(step)
        generator = step_generator(config.seed, step, 0, _SALT_CLASSIFIER, device=device)
        loss = classifier_loss(classifier, sde, x0, labels, eps, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(float(loss.detach()))
        if progress and ((step + 1) % log_every == 0 or step + 1 == n_iters):
            print(f"[classifier] step {step + 1}/{n_iters} loss {sum(running[-log_every:]) / len(running[-log_every:]):.4f}")
    classifier.eval()
    x0, labels = stream.labelled_batch(n_iters)  # a batch not used for training
    generator = step_generator(config.seed, n_iters, 1, _SALT_CLASSIFIER, device=device)
    accuracy = {str(t): classifier_accuracy(classifier, sde, x0, labels, t, generator) for t in (0.01, 0.3, 0.6, 1.0)}
    summary = {"step": n_iters, "loss": sum(running[-log_every:]) / len(running[-log_every:]),
               "accuracy_at_t": accuracy, "seconds": round(time.perf_counter() - start, 2),
               "path": classifier_path(workdir)}
    save_checkpoint(classifier_path(workdir), {"state_dict": classifier.state_dict(), "step": n_iters,
                                               "num_classes": classifier.num_classes, "classifier_config": c.to_dict()})
    write_json(os.path.join(workdir, "classifier_summary.json"), summary, indent=1)
    return summary


def load_classifier(config, workdir: str, device: torch.device) -> nn.Module:
    """The trained classifier of a run (eval mode); UserError if it is missing, corrupt or of another shape."""
    path = classifier_path(workdir)
    if not os.path.exists(path):
        raise UserError(f"no classifier at {path}; train one first with --mode train_classifier "
                        f"(same --config and --workdir)")
    state = read_verified(path, "classifier", map_location=device)  # checksum, finite weights, one-line errors
    try:
        classifier = create_classifier(config).to(device)
        classifier.load_state_dict(state["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"classifier {path} does not match config.classifier / the data: "
                        f"{str(error).splitlines()[0][:200]}") from None
    return classifier.eval()


def run(config, workdir: str, args) -> int:
    """`--mode train_classifier`: train p_t(c | x) for the run in workdir and report its accuracy."""
    check_settings(config, args, "train_classifier", get_sde)  # also when called without main.py
    check_output_files([classifier_path(workdir), os.path.join(workdir, "classifier_summary.json")])
    if os.path.exists(classifier_path(workdir)):
        raise UserError(f"{classifier_path(workdir)} exists (a trained classifier); delete it, or use another "
                        "--workdir, to train a new one")
    summary = train_classifier(config, workdir, progress=bool(config.training.get("progress", True)))
    accuracy = ", ".join(f"t={t}: {a:.3f}" for t, a in summary["accuracy_at_t"].items())
    print(f"[classifier] {summary['step']} steps in {summary['seconds']:.1f}s, loss {summary['loss']:.4f}; "
          f"accuracy {accuracy} -> {summary['path']}")
    return 0

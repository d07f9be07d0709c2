"""Divergence of a vector field: exact (autograd over dimensions) or Hutchinson-Skilling estimate.

Both return a (batch,) tensor, the divergence per sample. The exact version costs one vector-Jacobian
product per data dimension; the Hutchinson-Skilling estimator (Hutchinson 1989, Skilling 1989;
Grathwohl et al. 2019) costs one per probe: div f(x) ~ mean_k eps_k^T (df/dx) eps_k, E[eps eps^T] = I.
"""
from __future__ import annotations

import torch

from errors import UserError

DIVERGENCES = ("exact", "hutchinson_gaussian", "hutchinson_rademacher")


def draw_probes(x: torch.Tensor, divergence: str, n_probes: int,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Probes of shape (n_probes, *x.shape) with E[eps eps^T] = I (None for the exact divergence)."""
    if divergence == "exact":
        return None
    gen_device = generator.device if generator is not None else x.device
    shape = (n_probes,) + tuple(x.shape)
    if divergence == "hutchinson_gaussian":
        probes = torch.randn(shape, generator=generator, device=gen_device, dtype=x.dtype)
    elif divergence == "hutchinson_rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=gen_device)
        probes = (2 * bits - 1).to(x.dtype)
    else:
        raise UserError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    return probes.to(x.device)


def _batched_vjp(out: torch.Tensor, x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """v^T (d out / d x) for each v in `vectors` (k, *x.shape); returns (k, *x.shape)."""
    if vectors.shape[0] == 1:  # a single backward pass: vmap would only add overhead
        return torch.autograd.grad(out, x, grad_outputs=vectors[0], retain_graph=True)[0][None]
    try:
        (vjps,) = torch.autograd.grad(out, x, grad_outputs=vectors, is_grads_batched=True,
                                      retain_graph=True)
        return vjps
    except RuntimeError:
        # Some operators have no batching rule for vmap; fall back to one backward pass per vector.
        return torch.stack([torch.autograd.grad(out, x, grad_outputs=v, retain_graph=True)[0]
                            for v in vectors])


def hutchinson_divergence(out: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Hutchinson-Skilling estimate mean_k eps_k^T (d out/d x) eps_k, per sample; out = f(x) with x requiring grad."""
    vjps = _batched_vjp(out, x, probes)  # (k, batch, ...)
    return (vjps * probes).flatten(2).sum(-1).mean(0)


def exact_divergence(out: torch.Tensor, x: torch.Tensor, chunk: int = 256,
                     max_elements: int = 2 ** 25) -> torch.Tensor:
    """Trace of d out / d x per sample, one VJP per dimension (batched up to `chunk` dimensions at a time,
    fewer when the basis vectors of a chunk would exceed `max_elements` entries)."""
    batch, dim = x.shape[0], x[0].numel()
    chunk = max(1, min(chunk, max_elements // max(1, batch * dim)))
    total = torch.zeros(batch, dtype=x.dtype, device=x.device)
    for start in range(0, dim, chunk):
        idx = torch.arange(start, min(start + chunk, dim), device=x.device)
        basis = torch.zeros(len(idx), batch, dim, dtype=x.dtype, device=x.device)
        basis[torch.arange(len(idx), device=x.device), :, idx] = 1.0  # e_i for every sample
        vjps = _batched_vjp(out, x, basis.reshape((len(idx),) + tuple(x.shape))).reshape(len(idx), batch, dim)
        total = total + vjps[torch.arange(len(idx), device=x.device), :, idx].sum(0)  # sum_i (J^T e_i)_i
    return total

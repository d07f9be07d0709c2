"""Divergence of a vector field: exact (autograd over dimensions), Hutchinson-Skilling or Hutch++ estimate.

All return a (batch,) tensor, the divergence per sample. The exact version costs one vector-Jacobian
product per data dimension; the Hutchinson-Skilling estimator (Hutchinson 1989, Skilling 1989;
Grathwohl et al. 2019) costs one per probe: div f(x) ~ mean_k eps_k^T (df/dx) eps_k, E[eps eps^T] = I.
Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Alg. 1) with sketch size k costs 3k: it computes the trace
of a rank-k part of the Jacobian exactly and estimates only the rest with k Hutchinson probes.
"""
from __future__ import annotations

import torch

from errors import UserError

DIVERGENCES = ("exact", "hutchinson_gaussian", "hutchinson_rademacher", "hutchpp", "hutchpp_plain")
HUTCHPP = ("hutchpp", "hutchpp_plain")  # probes: n_probes sketch vectors S, then n_probes Hutchinson vectors G


def draw_probes(x: torch.Tensor, divergence: str, n_probes: int,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Probes with E[eps eps^T] = I, drawn once per integration (None for the exact divergence).

    Shape (n_probes, *x.shape); for Hutch++ (2 n_probes, *x.shape): the sketch S, then the Hutchinson vectors G,
    all Rademacher.
    """
    if divergence == "exact":
        return None
    gen_device = generator.device if generator is not None else x.device
    shape = ((2 if divergence in HUTCHPP else 1) * n_probes,) + tuple(x.shape)
    if divergence == "hutchinson_gaussian":
        probes = torch.randn(shape, generator=generator, device=gen_device, dtype=x.dtype)
    elif divergence == "hutchinson_rademacher" or divergence in HUTCHPP:
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


def hutchpp_divergence(out: torch.Tensor, x: torch.Tensor, probes: torch.Tensor,
                       diagonal: bool = True) -> torch.Tensor:
    """Hutch++ estimate of tr(d out / d x) per sample from probes = [S; G] (2k, *x.shape); 3k VJPs.

    With A = J^T (what a VJP applies, tr A = tr J), Hutch++ (Meyer et al. 2021, Alg. 1) is, for Q = orth(A S),
    P = Q Q^T:   tr A = tr(Q^T A Q) + E_G[(1/k) sum_j g_j^T (I - P) A (I - P) g_j]   (exact for any fixed S,
    since tr A = tr(P A P) + tr((I - P) A (I - P)); unbiased over G whatever S is).

    `diagonal=True` (the "hutchpp" divergence) applies it to A' = A - diag(w d), d = (1/k) sum_j s_j * (A s_j) the
    diagonal estimate of the sketch round (Bekas et al. 2007; free: A S is already there), and adds w sum_i d_i:
        tr A = w sum_i d_i + tr(Q'^T A' Q') + (1/k) sum_j h_j^T A' h_j,   Q' = orth(A' S), h_j = (I - Q'Q'^T) g_j.
    d and w depend on S only, so this stays unbiased given S. Why: a PF-ODE Jacobian is often a diagonal Lambda
    plus a low-rank part (mixtures with diagonal covariances: the posterior covariance of the component scores).
    Rademacher probes get a diagonal exactly, but plain Hutch++ ("hutchpp_plain") projects it with P, which
    mixes it into off-diagonal terms: on mix64 it was measured worse than Rademacher probes at equal VJPs
    (docs/PERFORMANCE.md). Removing the diagonal first leaves the low-rank part to the sketch, but d carries the
    noise E of the off-diagonal part, ||E||_F^2 ~ ||offdiag A||_F^2 / k; the leftover variance goes roughly as
    (1 - w)^2 ||Lambda||^2 + w^2 ||E||^2, least at w = ||Lambda||^2 / ||d||^2 ~ 1 - ||offdiag A||^2 / (k ||d||^2):
        w = max(0, 1 - ||A S - d * S||_F^2 / (k^2 ||d||^2))      (||A S - d * S||_F^2 / k ~ ||offdiag A||_F^2)
    so w -> 1 where the diagonal dominates (one mixture component) and w -> 0 (plain Hutch++) where the low-rank
    part does (several components mix); both measured on mix64 Jacobians (tests/test_divergence_hutchpp.py).

    Rank: Q comes from a Householder QR, orthonormal even where A' S is rank-deficient (then its extra columns
    are arbitrary, still unbiased, but P may then jump between ODE steps); where D <= k, P = I and the estimate
    is the exact trace (no probe round).
    """
    k, batch = probes.shape[0] // 2, x.shape[0]
    sketch = probes[:k].reshape(k, batch, -1)
    gauss = probes[k:].reshape(k, batch, -1)
    a_s = _batched_vjp(out, x, probes[:k]).reshape(k, batch, -1)  # round 1: A S, k VJPs
    diag = torch.zeros_like(sketch[0])  # (batch, D)
    if diagonal:
        diag = (sketch * a_s).mean(0)
        off = (a_s - diag * sketch).pow(2).sum(-1).mean(0)  # ~ ||offdiag A||_F^2 per sample
        weight = (1 - off / (k * diag.pow(2).sum(-1)).clamp_min(torch.finfo(x.dtype).tiny)).clamp_min(0.0)
        diag = weight[:, None] * diag
    q = torch.linalg.qr((a_s - diag * sketch).permute(1, 2, 0)).Q  # (batch, D, m), m = min(D, k)
    dim, m = q.shape[1], q.shape[2]
    vectors = q.permute(2, 0, 1)  # the columns of Q, (m, batch, D)
    if m < dim:  # else P = I: tr A' = tr(Q^T A' Q), nothing left to estimate
        g_cols = gauss.permute(1, 2, 0)  # (batch, D, k)
        resid = (g_cols - q @ (q.transpose(1, 2) @ g_cols)).permute(2, 0, 1)  # h_j = (I - P) g_j
        vectors = torch.cat([vectors, resid])
    a_v = _batched_vjp(out, x, vectors.reshape((-1,) + tuple(x.shape))).reshape(vectors.shape)  # round 2: A Q, A h
    quad = (vectors * (a_v - diag * vectors)).sum(-1)  # v^T A' v for every column of Q and every h_j
    trace = diag.sum(-1) + quad[:m].sum(0)
    return trace + quad[m:].mean(0) if m < dim else trace


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

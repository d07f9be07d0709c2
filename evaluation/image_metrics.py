"""Image sample-quality metrics on features: Frechet distance (FID), KID and Inception Score.

Plain functions on arrays, usable from a notebook on any features; `inception_features` runs the standard
FID Inception (evaluation/inception.py) over uint8 images in batches.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.special
import torch

from errors import UserError


def _matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {x.shape}")
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    x = _matrix(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)
    centered = x - mu
    return mu, centered.T @ centered / (x.shape[0] - 1)


def _noise_free(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those at round-off level (l <= sqrt(D) eps max|l|) set to 0.

    Their square roots would otherwise add sqrt(round-off) each, a large error at rank deficiency (a covariance
    of fewer samples than dimensions); a true eigenvalue below the level loses at most sqrt(sqrt(D) eps max|l|),
    the resolution of any float64 route near 0.
    """
    tol = np.sqrt(values.shape[0]) * np.finfo(np.float64).eps * max(float(np.abs(values).max(initial=0.0)), 1e-300)
    return np.where(values > tol, values, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (round-off eigenvalues set to 0)."""
    values, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(_noise_free(values))) @ vectors.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """Tr((sigma1 sigma2)^{1/2}) for symmetric PSD matrices, accurate when they are (near-)singular.

    (S1 S2)^{1/2} is similar to (S1^{1/2} S2 S1^{1/2})^{1/2}, a symmetric PSD matrix, so the trace is the sum
    of the square roots of that matrix's eigenvalues: two symmetric eigendecompositions, no general sqrtm
    of a non-symmetric product (which loses accuracy or turns complex at rank deficiency).
    """
    s1 = np.asarray(sigma1, dtype=np.float64)
    s2 = np.asarray(sigma2, dtype=np.float64)
    root1 = _psd_sqrt((s1 + s1.T) / 2)
    middle = root1 @ ((s2 + s2.T) / 2) @ root1
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(_noise_free(values)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance of N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al., 2017):

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}). FID is this on Inception pool features.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64).ravel(), np.asarray(mu2, dtype=np.float64).ravel()
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))  # >= 0 exactly; round-off can make a zero distance a tiny negative number


def frechet_distance_to_features(features, mu2, sigma2) -> float:
    """frechet_distance(mean and covariance of (N, D) `features`, mu2, sigma2), cheaper and exact when N <= D.

    With sigma1 = A A^T, A = (X - mu1)^T / sqrt(N - 1) (D x N), the nonzero eigenvalues of sigma1 sigma2 are
    those of the N x N matrix A^T sigma2 A, so Tr((sigma1 sigma2)^{1/2}) needs no D x D decomposition and
    no square root of round-off eigenvalues in sigma1's null space (a covariance of fewer samples than dims).
    """
    x = _matrix(features, "features")
    n, d = x.shape
    if n > d:
        return frechet_distance(*feature_statistics(x), mu2, sigma2)
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
    mu1 = x.mean(axis=0)
    mu2, sigma2 = np.asarray(mu2, dtype=np.float64).ravel(), np.asarray(sigma2, dtype=np.float64)
    if mu2.shape != (d,) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: features of dimension {d}, mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    a = (x - mu1).T / np.sqrt(n - 1)
    small = a.T @ ((sigma2 + sigma2.T) / 2) @ a
    root_trace = float(np.sqrt(_noise_free(np.linalg.eigvalsh((small + small.T) / 2))).sum())
    diff = mu1 - mu2
    value = diff @ diff + float((a * a).sum()) + np.trace(sigma2) - 2.0 * root_trace
    return float(max(value, 0.0))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3, the kernel of KID (Binkowski et al., 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased estimator of MMD^2 with the KID kernel (Gretton et al., 2012, eq. 3):

    1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j).
    """
    x, y = _matrix(x, "x"), _matrix(y, "y")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kid(features_a, features_b, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 over random subsets (Binkowski et al., 2018).

    Each of `num_subsets` rounds draws `subset_size` rows of each set without replacement (fewer if a set is
    smaller); the estimator is unbiased for every subset, so its mean is ~0 for equal distributions.
    """
    a, b = _matrix(features_a, "features_a"), _matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    size = min(int(subset_size), a.shape[0], b.shape[0])
    if size < 2 or num_subsets < 1:
        raise ValueError(f"KID needs subsets of at least 2 rows and at least one subset, got {size} and {num_subsets}")
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(a[rng.choice(a.shape[0], size, replace=False)],
                                     b[rng.choice(b.shape[0], size, replace=False)]) for _ in range(num_subsets)])
    return float(values.mean()), float(values.std())


def inception_score(scores, splits: int = 10, probs: bool = False) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al., 2016): mean and std over `splits` parts.

    `scores`: (N, K) logits (softmax taken here), or class probabilities with `probs=True`. p(y) is the mean of
    p(y|x) within each part.
    """
    s = _matrix(scores, "scores")
    if splits < 1 or s.shape[0] < splits:
        raise ValueError(f"need at least `splits` ({splits}) rows, got {s.shape[0]}")
    if probs:
        if (s < 0).any() or not np.allclose(s.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("probs=True needs rows of non-negative probabilities summing to 1")
        log_p = np.log(np.clip(s, 1e-300, None))
    else:
        log_p = s - scipy.special.logsumexp(s, axis=1, keepdims=True)
    p = np.exp(log_p)
    parts, n = [], s.shape[0]
    for k in range(splits):  # rows [k N / splits, (k + 1) N / splits), as Salimans et al.'s code and torch-fidelity
        lo, hi = k * n // splits, (k + 1) * n // splits
        chunk_log_p, chunk_p = log_p[lo:hi], p[lo:hi]
        log_marginal = np.log(np.clip(chunk_p.mean(axis=0), 1e-300, None))
        kl = (chunk_p * (chunk_log_p - log_marginal)).sum(axis=1).mean()
        parts.append(np.exp(kl))
    return float(np.mean(parts)), float(np.std(parts))


def as_rgb_uint8(images) -> torch.Tensor:
    """(N, C, H, W) uint8 images with C = 1 or 3 (or NHWC with C last) as an (N, 3, H, W) uint8 tensor."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise UserError(f"Inception features need uint8 images (N, C, H, W), got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grayscale: the same plane in R, G and B
    if x.shape[1] != 3:
        raise UserError(f"Inception features need 1 or 3 channels, got shape {tuple(x.shape)}")
    return x.contiguous()


def inception_features(images, network: torch.nn.Module, batch_size: int = 50,
                       device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pool features (N, 2048), logits (N, 1008)) of uint8 images through `network` in batches, float64.

    `network` is evaluation.inception.build_inception(...) (any module returning (features, logits) from
    uint8 NCHW input works); grayscale images are repeated to RGB; resizing to 299 happens inside the network.
    """
    x = as_rgb_uint8(images)
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device) if device is not None else next(network.parameters()).device
    pools, logits = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            pool, logit = network(x[start:start + batch_size].to(device))
            pools.append(pool.double().cpu())
            logits.append(logit.double().cpu())
    return torch.cat(pools).numpy(), torch.cat(logits).numpy()

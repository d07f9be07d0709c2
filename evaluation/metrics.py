"""Sample-quality metrics against exact targets: sliced Wasserstein-2, mode weights, mean log-density."""
from __future__ import annotations

import torch

from data.mixtures import GaussianMixture


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _quantiles(sorted_proj: torch.Tensor, m: int) -> torch.Tensor:
    """Empirical quantile functions (columns sorted) at the m levels (k + 1/2) / m."""
    n = sorted_proj.shape[0]
    levels = (torch.arange(m, dtype=torch.float64, device=sorted_proj.device) + 0.5) / m
    return sorted_proj[torch.clamp((levels * n).long(), max=n - 1)]


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance: sqrt of the mean over random unit directions of W_2^2 of the projections.

    Per direction the 1-D W_2 is the L2 distance between quantile functions (sorted projections); sets of
    different sizes are compared at common quantile levels. Pass the same `generator` seed to compare runs.
    """
    x, y = _as_matrix(x), _as_matrix(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    device = generator.device if generator is not None else x.device
    directions = torch.randn(x.shape[1], n_projections, generator=generator, device=device, dtype=torch.float64)
    directions = (directions / directions.norm(dim=0, keepdim=True)).to(x.device)
    px = torch.sort(x @ directions, dim=0).values
    py = torch.sort(y.to(x.device) @ directions, dim=0).values
    if px.shape[0] != py.shape[0]:
        m = max(px.shape[0], py.shape[0])
        px, py = _quantiles(px, m), _quantiles(py, m)
    return float(((px - py) ** 2).mean().sqrt())


def mode_weights(samples: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    """Fraction of samples assigned to each component (the most probable one under the exact posterior)."""
    x = _as_matrix(samples)
    labels = mixture.component_posterior(x, 0.0, None).argmax(dim=1)
    return torch.bincount(labels, minlength=mixture.num_components).to(torch.float64) / x.shape[0]


def mode_weight_tv(samples: torch.Tensor, mixture: GaussianMixture) -> float:
    """Total-variation distance between the samples' mode weights and the mixture weights."""
    weights = mode_weights(samples, mixture)
    return float(0.5 * (weights - mixture.weights.to(weights)).abs().sum())


def mean_log_density_gap(samples: torch.Tensor, mixture: GaussianMixture,
                         reference: torch.Tensor | None = None, n_reference: int = 20000,
                         generator: torch.Generator | None = None) -> float:
    """E_true[log p] - E_samples[log p] under the exact mixture density (0 for exact samples, up to MC error).

    E_true is estimated on `reference` (exact samples), or on n_reference fresh exact draws.
    Positive: samples sit in lower-density regions (too spread); negative: too concentrated.
    """
    if reference is None:
        reference = mixture.sample(n_reference, generator=generator, dtype=torch.float64)
    true_mean = mixture.log_prob(_as_matrix(reference)).mean()
    return float(true_mean - mixture.log_prob(_as_matrix(samples)).mean())


def mixture_report(samples: torch.Tensor, mixture: GaussianMixture, reference: torch.Tensor,
                   n_projections: int = 256, seed: int = 0,
                   logp_reference: torch.Tensor | None = None) -> dict[str, float]:
    """SW-2 to exact samples, mode-weight TV and mean log-density gap, as one dict.

    `logp_reference` (default `reference`): exact samples for E_true[log p]; a large set lowers the gap's noise.
    """
    generator = torch.Generator().manual_seed(seed)
    return {
        "sw2": sliced_wasserstein(samples.cpu(), reference.cpu(), n_projections, generator),
        "mode_tv": mode_weight_tv(samples, mixture),
        "logp_gap": mean_log_density_gap(samples, mixture, reference if logp_reference is None else logp_reference),
    }


def noise_floor(mixture: GaussianMixture, n: int, n_projections: int = 256, seed: int = 0,
                n_pairs: int = 1) -> dict[str, float]:
    """The metrics of exact samples against independent exact samples of the same size n (mean over pairs)."""
    totals: dict[str, float] = {}
    for k in range(n_pairs):
        g = torch.Generator().manual_seed(10_000 + seed + k)
        a = mixture.sample(n, generator=g, dtype=torch.float64)
        b = mixture.sample(n, generator=g, dtype=torch.float64)
        for key, value in mixture_report(a, mixture, b, n_projections, seed).items():
            totals[key] = totals.get(key, 0.0) + value / n_pairs
    return totals

"""Analytic targets: exact sampling, densities and perturbed scores of Gaussian mixtures."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from data import GaussianMixture, sample_toy, toy_mixture
from sde_lib import VESDE, VPSDE, subVPSDE

SDES = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE(0.01, 20.0)}


def test_log_prob_matches_scipy():
    mix = toy_mixture("mix64")
    x = mix.sample(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    comps = [multivariate_normal(mix.means[k].numpy(), np.diag(mix.stds[k].numpy() ** 2))
             for k in range(mix.num_components)]
    expected = np.log(sum(w * c.pdf(x.numpy()) for w, c in zip(mix.weights.numpy(), comps)))
    np.testing.assert_allclose(mix.log_prob(x).numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("name", ["ring2d", "grid2d", "mix64"])
def test_sample_moments(name):
    mix = toy_mixture(name)
    x, labels = mix.sample(100000, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                           return_labels=True)
    mean = (mix.weights[:, None] * mix.means).sum(0)
    second = (mix.weights[:, None] * (mix.means ** 2 + mix.stds ** 2)).sum(0)
    sem = torch.sqrt(second - mean ** 2) / math.sqrt(len(x))
    assert ((x.mean(0) - mean).abs() < 5 * sem).all()
    freq = torch.bincount(labels, minlength=mix.num_components).double() / len(x)
    assert torch.allclose(freq, mix.weights, atol=5 * math.sqrt(0.25 / len(x)))


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("target", ["ring2d", "mix64"])
def test_marginal_score_is_gradient_of_marginal_log_prob(name, target):
    sde, mix = SDES[name], toy_mixture(target)
    gen = torch.Generator().manual_seed(2)
    for t in [1e-3, 0.1, 0.5, 1.0]:
        x0 = mix.sample(16, generator=gen, dtype=torch.float64)
        mean, std = sde.marginal_prob(x0, t)
        x = (mean + std[:, None] * torch.randn(x0.shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
        grad, = torch.autograd.grad(mix.marginal_log_prob(x, t, sde).sum(), x)
        assert torch.allclose(mix.marginal_score(x.detach(), t, sde), grad, rtol=1e-9, atol=1e-9)
    t = torch.rand(16, dtype=torch.float64)  # per-sample times
    x = torch.randn(16, mix.dim, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(mix.marginal_log_prob(x, t, sde).sum(), x)
    assert torch.allclose(mix.marginal_score(x.detach(), t, sde), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("t", [0.0, 0.05, 0.3])
def test_marginal_integrates_to_one(name, t):
    """2-D grid quadrature of exp(marginal_log_prob) over a box holding all the mass."""
    sde, mix = SDES[name], toy_mixture("ring2d")
    std = sde.marginal_std(torch.tensor(t, dtype=torch.float64)).item()
    half = 2.0 * sde.mean_coeff(torch.tensor(t, dtype=torch.float64)).item() + 8 * math.hypot(0.2, std)
    n = 600
    grid = torch.linspace(-half, half, n, dtype=torch.float64)
    xy = torch.cartesian_prod(grid, grid)
    density = mix.marginal_log_prob(xy, t, sde).exp()
    total = density.sum().item() * (grid[1] - grid[0]).item() ** 2
    assert total == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", SDES)
def test_marginal_at_T_is_close_to_prior(name):
    """KL(prior || p_T) estimated by Monte Carlo is small: the prior stands in for p_T."""
    sde, mix = SDES[name], toy_mixture("ring2d")
    z = sde.prior_sampling((20000, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kl = (sde.prior_logp(z) - mix.marginal_log_prob(z, sde.T, sde)).mean().item()
    assert -1e-3 < kl < 5e-3


def test_component_posterior_and_score_fn():
    mix, sde = toy_mixture("ring2d"), VPSDE()
    x = mix.means.clone()
    post = mix.component_posterior(x)
    assert torch.allclose(post.diagonal(), torch.ones(8, dtype=torch.float64), atol=1e-6)
    t = torch.full((8,), 0.4, dtype=torch.float64)
    assert torch.allclose(mix.score_fn(sde)(x, t), mix.marginal_score(x, t, sde))


def test_diagonal_and_isotropic_stds_and_errors():
    iso = GaussianMixture([1, 3], [[0.0, 0.0], [1.0, 1.0]], [0.5, 2.0])
    diag = GaussianMixture([1, 3], [[0.0, 0.0], [1.0, 1.0]], [[0.5, 0.5], [2.0, 2.0]])
    x = torch.randn(10, 2, dtype=torch.float64)
    assert torch.allclose(iso.log_prob(x), diag.log_prob(x))
    assert torch.allclose(iso.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixture([1.0], [0.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture([1.0], [[0.0]], [0.0])
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 2\)"):
        iso.log_prob(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="unknown toy mixture 'nope'"):
        toy_mixture("nope")


@pytest.mark.parametrize("name", ["moons", "swissroll", "checkerboard", "ring2d"])
def test_sample_toys(name):
    x = sample_toy(name, 500, generator=torch.Generator().manual_seed(0))
    again = sample_toy(name, 500, generator=torch.Generator().manual_seed(0))
    assert x.shape == (500, 2) and torch.equal(x, again)
    assert x.abs().max() < 4
    with pytest.raises(ValueError, match="valid: ring2d"):
        sample_toy("spiral", 10)


def test_digits():
    from data import load_digits_uint8

    images, labels = load_digits_uint8()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and set(labels.tolist()) == set(range(10))


def test_mixture_refuses_integer_inputs_and_non_finite_parameters():
    """An integer x cast the means to integers inside (log_prob NaN); NaN weights passed the positivity check."""
    import pytest

    from data import GaussianMixture, toy_mixture

    ring = toy_mixture("ring2d")
    with pytest.raises(ValueError, match="x must be a floating-point tensor, got a torch.int64 tensor"):
        ring.log_prob(torch.zeros(3, 2, dtype=torch.long))
    for weights, means in (([float("nan"), 1.0], [[0.0], [1.0]]), ([float("inf"), 1.0], [[0.0], [1.0]]),
                           ([1.0, 1.0], [[0.0], [float("nan")]])):
        with pytest.raises(ValueError, match="finite"):
            GaussianMixture(weights, means, 1.0)

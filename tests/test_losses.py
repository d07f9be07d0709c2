"""Each score-matching loss at its optimum (the exact mixture score) equals its known minimum, computed
independently from the Fisher information J(t) = E||grad log p_t||^2 of the exact marginal:

  E ||grad log p_0t(x_t | x_0) - grad log p_t(x_t)||^2 = d / sigma^2 - J(t)   (the conditional-score variance),

with J(t) estimated by Monte Carlo on fresh draws of the marginal mixture and autograd of its log-density;
a perturbed score gives a larger loss.
"""
import math

import numpy as np
import pytest
import torch

from data import GaussianMixture, toy_mixture
from sde_lib import VESDE, VPSDE, subVPSDE
from training.losses import (ImportanceTimeSampler, ddpm_alpha_bar, ddpm_loss, dsm_loss, get_loss_fn,
                             resolve_loss_name, sliced_score_matching_loss, smld_loss)
from errors import UserError

D = 2
RING = toy_mixture("ring2d")


def fisher_information(alpha: float, sigma: float, m: int, seed: int) -> float:
    """J = E_{x ~ p_t} ||grad log p_t(x)||^2 for the ring pushed through a kernel N(alpha x0, sigma^2)."""
    marginal = GaussianMixture(RING.weights, alpha * RING.means,
                               torch.sqrt(alpha ** 2 * RING.stds ** 2 + sigma ** 2))
    x = marginal.sample(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_(True)
    (score,) = torch.autograd.grad(marginal.log_prob(x).sum(), x)
    return float((score ** 2).sum(1).mean())


def gauss_legendre(fn, a: float, b: float, n: int, log_scale: bool = False) -> float:
    """Mean of fn(t) over t ~ U[a, b] by n-point Gauss-Legendre (in u = log t when log_scale)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    if log_scale:
        lo, hi = math.log(a), math.log(b)
        u = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
        total = sum(w * fn(math.exp(ui)) * math.exp(ui) for w, ui in zip(weights, u)) * 0.5 * (hi - lo)
    else:
        t = 0.5 * (b - a) * nodes + 0.5 * (b + a)
        total = sum(w * fn(ti) for w, ti in zip(weights, t)) * 0.5 * (b - a)
    return total / (b - a)


def coefficients(sde, t: float) -> tuple[float, float, float]:
    tt = torch.tensor([t], dtype=torch.float64)
    _, g = sde.sde(torch.zeros(1, D, dtype=torch.float64), tt)
    return float(sde.mean_coeff(tt)), float(sde.marginal_std(tt)), float(g) ** 2


def data(n: int, seed: int = 1) -> torch.Tensor:
    return RING.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_score(sde):
    return RING.score_fn(sde)


def shifted(score_fn, delta: float):
    return lambda x, t: score_fn(x, t) + delta


def mc_tolerance(per_sample: torch.Tensor) -> float:
    return 4.0 * float(per_sample.std()) / math.sqrt(per_sample.numel())


N_MC = 200_000


@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0), subVPSDE(0.1, 20.0), VESDE(0.01, 8.0)],
                         ids=["vp", "subvp", "ve"])
def test_dsm_default_weighting_minimum(sde):
    eps = 1e-3
    x0 = data(N_MC)
    loss = dsm_loss(exact_score(sde), sde, x0, eps=eps, generator=torch.Generator().manual_seed(2))

    def integrand(t):
        alpha, sigma, _ = coefficients(sde, t)
        return D - sigma ** 2 * fisher_information(alpha, sigma, 4000, seed=int(t * 1e6))

    # reduce_mean=False: half the squared norm per sample (the reference's 0.5 * sum)
    expected = 0.5 * gauss_legendre(integrand, eps, 1.0, 48, log_scale=True)
    # per-sample losses have std ~ 1 here; 4-sigma MC band plus a small quadrature allowance
    assert float(loss) == pytest.approx(expected, abs=0.015)
    assert 0.05 < expected < D / 2 - 0.05  # a real variance term: neither 0 nor the trivial d / 2

    delta = 0.3
    worse = dsm_loss(shifted(exact_score(sde), delta), sde, x0, eps=eps, generator=torch.Generator().manual_seed(2))
    # with common random numbers the excess is E sigma^2 ||delta||^2 plus a zero-mean cross term
    excess = 0.5 * gauss_legendre(lambda t: coefficients(sde, t)[1] ** 2 * D * delta ** 2, eps, 1.0, 48)
    assert float(worse) > float(loss)
    assert float(worse - loss) == pytest.approx(excess, rel=0.1)


def test_dsm_likelihood_weighting_minimum_and_importance_sampling():
    sde, eps = VPSDE(0.1, 20.0), 1e-2
    x0 = data(N_MC)

    def integrand(t):
        alpha, sigma, g2 = coefficients(sde, t)
        return g2 * (D / sigma ** 2 - fisher_information(alpha, sigma, 4000, seed=int(t * 1e6)))

    expected = 0.5 * gauss_legendre(integrand, eps, 1.0, 64, log_scale=True)  # 0.5 * sum per sample
    plain = dsm_loss(exact_score(sde), sde, x0, eps=eps, likelihood_weighting=True,
                     generator=torch.Generator().manual_seed(3))
    sampler = ImportanceTimeSampler(sde, eps)
    weighted = dsm_loss(exact_score(sde), sde, x0, eps=eps, likelihood_weighting=True, importance_sampler=sampler,
                        generator=torch.Generator().manual_seed(4))
    # 200k samples: per-sample relative std ~2 -> about 1% standard error; 3% is a 3-sigma band
    assert float(plain) == pytest.approx(expected, rel=0.03)
    assert float(weighted) == pytest.approx(expected, rel=0.03)
    worse = dsm_loss(shifted(exact_score(sde), 0.2), sde, x0, eps=eps, likelihood_weighting=True,
                     importance_sampler=sampler, generator=torch.Generator().manual_seed(4))
    assert float(worse) > float(weighted) + 0.25 * gauss_legendre(lambda t: coefficients(sde, t)[2], eps, 1, 16) * D * 0.04


def test_importance_sampler_matches_closed_form_cdf():
    # For VP, g^2/sigma^2 = beta e^B / (e^B - 1) = d/dt log(e^B - 1): CDF(t) = [L(t) - L(eps)] / [L(T) - L(eps)]
    sde, eps = VPSDE(0.1, 20.0), 1e-5
    sampler = ImportanceTimeSampler(sde, eps)

    def L(t):
        return torch.log(torch.expm1(sde.integrated_beta(torch.as_tensor(t, dtype=torch.float64))))

    u = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    t = sampler.inverse_cdf(u)
    cdf = (L(t) - L(eps)) / (L(1.0) - L(eps))
    assert torch.allclose(cdf, u, atol=2e-4)
    assert sampler.normalizer == pytest.approx(float(L(1.0) - L(eps)), rel=1e-4)
    draws = sampler.sample(50_000, torch.zeros(1), generator=torch.Generator().manual_seed(0))
    assert float(draws.min()) >= eps and float(draws.max()) <= 1.0
    # VE: g^2 / sigma^2 is constant, so t is uniform
    ve = ImportanceTimeSampler(VESDE(0.01, 50.0), 1e-3)
    assert torch.allclose(ve.inverse_cdf(u), 1e-3 + (1 - 1e-3) * u, atol=1e-4)


class DiscreteVP:
    """The DDPM chain's marginal at grid times t_i = i / (N - 1), for the mixture's exact score."""

    def __init__(self, sde: VPSDE):
        self.sde = sde
        self.alpha_bar = ddpm_alpha_bar(sde, torch.arange(sde.N))

    def index(self, t):
        return torch.round(torch.as_tensor(t, dtype=torch.float64) * (self.sde.N - 1)).long()

    def mean_coeff(self, t):
        return torch.sqrt(self.alpha_bar[self.index(t)])

    def marginal_std(self, t):
        return torch.sqrt(1 - self.alpha_bar[self.index(t)])


class DiscreteVE:
    """SMLD's noise levels sigma_i at grid times t_i = i / (N - 1)."""

    def __init__(self, sde: VESDE):
        self.sde = sde

    def mean_coeff(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def marginal_std(self, t):
        i = torch.round(torch.as_tensor(t, dtype=torch.float64) * (self.sde.N - 1))
        return self.sde.discrete_sigmas(i)


def test_ddpm_discrete_loss_minimum():
    sde = VPSDE(0.1, 20.0, N=100)
    chain = DiscreteVP(sde)
    x0 = data(N_MC)
    score = lambda x, t: RING.marginal_score(x, t, chain)  # noqa: E731
    loss = ddpm_loss(score, sde, x0, reduce_mean=False, generator=torch.Generator().manual_seed(5))
    # alpha_bar from its definition prod (1 - beta_j), independently of the loss code
    betas = [0.1 / 100 + j * 19.9 / (100 * 99) for j in range(100)]
    alpha_bar = np.cumprod([1 - b for b in betas])
    expected = 0.5 * np.mean([D - (1 - a) * fisher_information(math.sqrt(a), math.sqrt(1 - a), 3000, seed=i)
                              for i, a in enumerate(alpha_bar)])  # 0.5 * sum per sample
    assert float(loss) == pytest.approx(expected, abs=0.015)
    worse = ddpm_loss(shifted(score, 0.3), sde, x0, reduce_mean=False, generator=torch.Generator().manual_seed(5))
    assert float(worse) > float(loss) + 0.25 * 0.09 * D * np.mean(1 - alpha_bar)
    mean_reduced = ddpm_loss(score, sde, x0, reduce_mean=True, generator=torch.Generator().manual_seed(5))
    assert float(mean_reduced) == pytest.approx(2 * float(loss) / D, rel=1e-9)  # mean = (0.5 sum) * 2 / D


def test_smld_discrete_loss_minimum():
    sde = VESDE(0.01, 8.0, N=60)
    chain = DiscreteVE(sde)
    x0 = data(N_MC)
    score = lambda x, t: RING.marginal_score(x, t, chain)  # noqa: E731
    loss = smld_loss(score, sde, x0, generator=torch.Generator().manual_seed(6))
    sigmas = 0.01 * (8.0 / 0.01) ** (np.arange(60) / 59)
    expected = 0.5 * np.mean([D - s ** 2 * fisher_information(1.0, s, 3000, seed=i) for i, s in enumerate(sigmas)])
    assert float(loss) == pytest.approx(expected, abs=0.015)
    worse = smld_loss(shifted(score, 0.2), sde, x0, generator=torch.Generator().manual_seed(6))
    assert float(worse) > float(loss)


def test_sliced_score_matching_minimum():
    # At s = grad log p_t: E[v^T grad(v^T s) + |s|^2 / 2] = -J(t) / 2 (integration by parts), weighted by sigma^2
    sde, eps = VPSDE(0.1, 20.0), 1e-3
    x0 = data(100_000)
    loss = sliced_score_matching_loss(exact_score(sde), sde, x0, eps=eps,
                                      generator=torch.Generator().manual_seed(7)).detach()

    def integrand(t):
        alpha, sigma, _ = coefficients(sde, t)
        return -0.5 * sigma ** 2 * fisher_information(alpha, sigma, 4000, seed=int(t * 1e6))

    expected = gauss_legendre(integrand, eps, 1.0, 48, log_scale=True)
    assert float(loss) == pytest.approx(expected, abs=0.03)
    worse = sliced_score_matching_loss(shifted(exact_score(sde), 0.3), sde, x0, eps=eps,
                                       generator=torch.Generator().manual_seed(7)).detach()
    assert float(worse) > float(loss)


def test_ssm_trains_through_the_second_derivative():
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    score = lambda x, t: net(torch.cat([x, t[:, None]], 1))  # noqa: E731
    loss = sliced_score_matching_loss(score, VPSDE(), data(64).float(), n_projections=2)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_loss_selection_and_errors():
    import configs

    config = configs.get_config("vp_toy")
    assert resolve_loss_name(config, VPSDE()) == "dsm"
    config.training.continuous = False
    assert resolve_loss_name(config, VPSDE()) == "ddpm"
    assert resolve_loss_name(config, VESDE()) == "smld"
    with pytest.raises(UserError, match="sub-VP"):
        resolve_loss_name(config, subVPSDE())
    config.training.loss = "nope"
    with pytest.raises(UserError, match="unknown training.loss"):
        resolve_loss_name(config, VPSDE())
    config = configs.get_config("vp_toy")
    config.training.importance_sampling = True
    with pytest.raises(UserError, match="likelihood_weighting"):
        get_loss_fn(config, VPSDE())
    config.training.importance_sampling = False
    config.training.eps = 0.0
    with pytest.raises(UserError, match="training.eps"):
        get_loss_fn(config, VPSDE())
    with pytest.raises(UserError, match="VP SDE"):
        ddpm_loss(exact_score(VESDE()), VESDE(), data(8))


# ----------------------------------------------------------------------------------------------------------
# Loss scales: every loss reduces per sample as the reference code (score_sde_pytorch losses.py, `reduce_op`):
# the mean over data dimensions with reduce_mean, 0.5 * the sum otherwise. The formulas are written out here
# from the recorded network inputs, so they do not depend on the order in which the losses draw t and z.

SHAPE = (2, 3)  # per-sample shape: the reduction runs over all non-batch dimensions
DIMS = 6


class Recorded:
    """A deliberately wrong score s(x, t) = -(1 + t) x + 0.3 that records what it was called with."""

    def __call__(self, x, t):
        self.x, self.t = x.detach().clone(), t.detach().clone()
        return -(1 + t).reshape(-1, 1, 1) * x + 0.3


def reference_reduce(squares: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    """Per-sample reduction of squared terms (batch, 2, 3) -> (batch,), written out."""
    total = squares.reshape(squares.shape[0], -1).sum(dim=1)
    return total / DIMS if reduce_mean else 0.5 * total


def image_data(n: int = 512, seed: int = 11) -> torch.Tensor:
    return torch.randn((n,) + SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def vp_closed_form(t: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0):
    """alpha(t), std(t) and g(t)^2 of the VP SDE, written out (Song et al., 2021, eq. 29 / 33)."""
    B = beta_min * t + 0.5 * t ** 2 * (beta_max - beta_min)
    return torch.exp(-0.5 * B), torch.sqrt(1 - torch.exp(-B)), beta_min + t * (beta_max - beta_min)


@pytest.mark.parametrize("reduce_mean", [True, False])
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood", "importance"])
def test_dsm_scale_is_the_references(reduce_mean, weighting):
    sde, eps, x0, score = VPSDE(0.1, 20.0), 1e-3, image_data(), Recorded()
    sampler = ImportanceTimeSampler(sde, eps) if weighting == "importance" else None
    loss = dsm_loss(score, sde, x0, eps=eps, reduce_mean=reduce_mean, likelihood_weighting=weighting != "sigma2",
                    importance_sampler=sampler, generator=torch.Generator().manual_seed(12))
    alpha, std, g2 = vp_closed_form(score.t)
    z = (score.x - alpha.reshape(-1, 1, 1) * x0) / std.reshape(-1, 1, 1)
    s = -(1 + score.t).reshape(-1, 1, 1) * score.x + 0.3
    if weighting == "sigma2":  # reference: reduce_op((score * std + z)^2)
        expected = reference_reduce((s * std.reshape(-1, 1, 1) + z) ** 2, reduce_mean).mean()
    elif weighting == "likelihood":  # reference: reduce_op((score + z / std)^2) * g^2
        expected = (reference_reduce((s + z / std.reshape(-1, 1, 1)) ** 2, reduce_mean) * g2).mean()
    else:  # t ~ g^2 / std^2 normalized by Z = [log(e^B - 1)]_eps^1: the weight g^2 / (std^2 q(t) (1 - eps))
        log_em1 = lambda t: math.log(math.expm1(0.1 * t + 0.5 * t ** 2 * 19.9))  # noqa: E731
        Z = log_em1(1.0) - log_em1(eps)
        expected = (reference_reduce((s * std.reshape(-1, 1, 1) + z) ** 2, reduce_mean) * Z / (1 - eps)).mean()
    rel = 1e-4 if weighting == "importance" else 1e-10  # the sampler's Z is tabulated (trapezoid rule)
    assert float(loss) == pytest.approx(float(expected), rel=rel)


@pytest.mark.parametrize("reduce_mean", [True, False])
def test_ddpm_scale_is_the_references(reduce_mean):
    n_steps = 50
    sde, x0, score = VPSDE(0.1, 20.0, N=n_steps), image_data(), Recorded()
    loss = ddpm_loss(score, sde, x0, reduce_mean=reduce_mean, generator=torch.Generator().manual_seed(13))
    i = torch.round(score.t * (n_steps - 1)).long()
    betas = torch.linspace(0.1 / n_steps, 20.0 / n_steps, n_steps, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[i].reshape(-1, 1, 1)
    noise = (score.x - torch.sqrt(abar) * x0) / torch.sqrt(1 - abar)
    eps_theta = -torch.sqrt(1 - abar) * (-(1 + score.t).reshape(-1, 1, 1) * score.x + 0.3)
    expected = reference_reduce((eps_theta - noise) ** 2, reduce_mean).mean()  # reduce_op((score - noise)^2)
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize("reduce_mean", [True, False])
def test_smld_scale_is_the_references(reduce_mean):
    n_scales, smin, smax = 40, 0.01, 8.0
    sde, x0, score = VESDE(smin, smax, N=n_scales), image_data(), Recorded()
    loss = smld_loss(score, sde, x0, reduce_mean=reduce_mean, generator=torch.Generator().manual_seed(14))
    i = torch.round(score.t * (n_scales - 1))
    sigma = (smin * (smax / smin) ** (i / (n_scales - 1))).reshape(-1, 1, 1)
    noise = score.x - x0
    target = -noise / sigma ** 2
    s = -(1 + score.t).reshape(-1, 1, 1) * score.x + 0.3
    # reference: reduce_op((score - target)^2) * sigma^2
    expected = (reference_reduce((s - target) ** 2, reduce_mean) * sigma.flatten() ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)


def test_sliced_score_matching_scale():
    """s = -(1 + t) x: the per-dimension terms s_d^2 + 2 v_d d_d(v^T s) have mean a^2 x_d^2 - 2a (a = 1 + t) over v,
    reduced as the reference reduces; with the same draws, reduce_mean=True is exactly 2 / d times the sum form."""
    sde, eps, x0 = VPSDE(0.1, 20.0), 1e-3, image_data(4000)
    recorder = Recorded()

    def score(x, t):
        recorder(x, t)
        return -(1 + t).reshape(-1, 1, 1) * x

    losses = {}
    for reduce_mean in (True, False):
        losses[reduce_mean] = float(sliced_score_matching_loss(
            score, sde, x0, eps=eps, reduce_mean=reduce_mean, n_projections=4,
            generator=torch.Generator().manual_seed(15)).detach())
        a = (1 + recorder.t).reshape(-1, 1, 1)
        _, std, _ = vp_closed_form(recorder.t)
        per_dim = a ** 2 * recorder.x ** 2 - 2 * a
        total = per_dim.reshape(per_dim.shape[0], -1).sum(1)
        reduced = total / DIMS if reduce_mean else 0.5 * total
        expected = float((reduced * std ** 2).mean())
        # the v-term has per-sample std <= sqrt(8 a^2 d / n_projections) std^2 / (d or 2): a 5-sigma band
        band = 5 * math.sqrt(8 * 4 * DIMS / 4) / (DIMS if reduce_mean else 2) / math.sqrt(x0.shape[0])
        assert losses[reduce_mean] == pytest.approx(expected, abs=band)
        # a wrong factor on the divergence term (1 instead of 2) moves the loss by E[a std^2] (1 or d/2): far outside
        assert band < 0.2 * float((a.flatten() * std ** 2).mean()) * (1 if reduce_mean else DIMS / 2)
    assert losses[True] == pytest.approx(losses[False] * 2 / DIMS, rel=1e-10)

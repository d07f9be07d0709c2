"""EDM and min-SNR-gamma weightings with their proposals in the one DSM loss (training/weightings.py): the loss at
the exact optimum equals a quadrature of the closed-form minimum, its gradient in a score scale vanishes there,
the log-normal proposal has the right law, and bad settings are one-line errors.

In the sigma view the minimum of R(std s + z) at noise level sigma is 0.5 (d - sigma^2 J(sigma)) with J the Fisher
information of the data convolved with N(0, sigma^2) (test_losses: std^2 J_t = sigma^2 J(sigma)).
"""
import math

import numpy as np
import pytest
import torch

import configs
from errors import UserError
from sde_lib import VESDE, VPSDE, subVPSDE
from test_losses import D, N_MC, RING, data, fisher_information
from training.losses import dsm_loss, get_loss_fn
from training.weightings import LogNormalSigmaSampler, sigma_of_t, t_of_sigma

EPS = 1e-3
SIGMA_DATA = 0.5


def minimum_at(sigma: float) -> float:
    """0.5 (d - sigma^2 J(sigma)): the per-sample minimum of R(std s + z) (reduce_mean=False)."""
    return 0.5 * (D - sigma ** 2 * fisher_information(1.0, sigma, 4000, seed=int(1e6 * sigma) % 2 ** 31))


def sigma_range(sde):
    ends = sigma_of_t(sde, torch.tensor([EPS, sde.T], dtype=torch.float64))
    return float(ends[0]), float(ends[1])


@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0), VESDE(0.01, 8.0)], ids=["vp", "ve"])
def test_edm_weighting_with_lognormal_proposal_at_the_optimum(sde):
    sampler = LogNormalSigmaSampler(sde, EPS, -1.2, 1.2)
    x0 = data(N_MC)
    loss = dsm_loss(RING.score_fn(sde), sde, x0, eps=EPS, weighting="edm", proposal=sampler,
                    sigma_data=SIGMA_DATA, generator=torch.Generator().manual_seed(5))
    # E_{ln sigma ~ N(-1.2, 1.2^2) on [ln sigma(eps), ln sigma(T)]} lambda(sigma) sigma^2 * minimum, by Gauss-Legendre
    lo, hi = (math.log(s) for s in sigma_range(sde))
    nodes, weights = np.polynomial.legendre.leggauss(64)
    u = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
    density = np.exp(-0.5 * ((u + 1.2) / 1.2) ** 2)
    values = [(math.exp(2 * ui) + SIGMA_DATA ** 2) / SIGMA_DATA ** 2 * minimum_at(math.exp(ui)) for ui in u]
    expected = float(np.sum(weights * density * values) / np.sum(weights * density))
    assert float(loss) == pytest.approx(expected, rel=0.03)


def test_min_snr_weighting_at_the_optimum():
    sde, gamma = VPSDE(0.1, 20.0), 5.0
    x0 = data(N_MC)
    loss = dsm_loss(RING.score_fn(sde), sde, x0, eps=EPS, weighting="min_snr", min_snr_gamma=gamma,
                    generator=torch.Generator().manual_seed(6))
    # t ~ U[eps, 1]; split at the kink gamma sigma^2 = 1 so that each Gauss-Legendre piece is smooth (in log t)
    kink = float(t_of_sigma(sde, torch.tensor([1 / math.sqrt(gamma)]), EPS))

    def piece(a, b):
        nodes, weights = np.polynomial.legendre.leggauss(32)
        la, lb = math.log(a), math.log(b)
        total = 0.0
        for w, v in zip(weights, 0.5 * (lb - la) * nodes + 0.5 * (lb + la)):
            sigma = float(sigma_of_t(sde, torch.tensor([math.exp(v)], dtype=torch.float64)))
            total += w * min(1.0, gamma * sigma ** 2) * minimum_at(sigma) * math.exp(v)
        return total * 0.5 * (lb - la)

    expected = (piece(EPS, kink) + piece(kink, 1.0)) / (1.0 - EPS)
    assert float(loss) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("weighting", ["edm", "min_snr"])
def test_gradient_in_a_score_scale_vanishes_at_the_optimum(weighting):
    sde = subVPSDE(0.1, 20.0)
    x0 = data(100_000, seed=7)
    proposal = LogNormalSigmaSampler(sde, EPS) if weighting == "edm" else None
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    exact = RING.score_fn(sde)

    def loss_at(score_fn):
        return dsm_loss(score_fn, sde, x0, eps=EPS, weighting=weighting, proposal=proposal,
                        generator=torch.Generator().manual_seed(8))

    (grad,) = torch.autograd.grad(loss_at(lambda x, t: exact(x, t) * scale), scale)
    # per sample d/d delta of w 0.5 ||std (1 + delta) s + z||^2 = w (std s) . (std s + z), replayed on the same draws
    g = torch.Generator().manual_seed(8)
    t = proposal.sample(x0.shape[0], x0, g) if proposal else (EPS + (1 - EPS) * torch.rand(
        x0.shape[0], generator=g, dtype=torch.float32)).to(torch.float64)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    std = sde.marginal_std(t)[:, None]
    std_s = std * exact(sde.mean_coeff(t)[:, None] * x0 + std * z, t)
    sigma2 = (sigma_of_t(sde, t) ** 2)
    w = (sigma2 + SIGMA_DATA ** 2) / SIGMA_DATA ** 2 if weighting == "edm" else torch.clamp(5.0 * sigma2, max=1.0)
    per_sample = w * (std_s * (std_s + z)).sum(1)
    torch.testing.assert_close(grad, per_sample.mean(), rtol=1e-8, atol=1e-12)
    band = 4 * float(per_sample.std()) / math.sqrt(x0.shape[0])
    assert abs(float(grad)) < band
    off = w * (1.1 * std_s * (1.1 * std_s + z)).sum(1)  # a 10% too large score is not stationary
    assert abs(float(off.mean())) > 3 * band


@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0), subVPSDE(0.1, 20.0), VESDE(0.01, 50.0)], ids=["vp", "subvp", "ve"])
def test_lognormal_proposal_law_and_sigma_inverse(sde):
    t = torch.linspace(EPS, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(t_of_sigma(sde, sigma_of_t(sde, t), EPS), t, rtol=1e-10, atol=1e-12)
    sampler = LogNormalSigmaSampler(sde, EPS, -1.2, 1.2)
    draws = sampler.sample(100_000, torch.zeros(1, dtype=torch.float64), torch.Generator().manual_seed(9))
    assert float(draws.min()) >= EPS and float(draws.max()) <= 1.0
    log_sigma = torch.log(sigma_of_t(sde, draws))
    lo, hi = (math.log(s) for s in sigma_range(sde))
    normal = torch.distributions.Normal(-1.2, 1.2)
    for q in (-3.0, -2.0, -1.2, 0.0, 1.0):
        if lo < q < hi:
            cdf = (normal.cdf(torch.tensor(q)) - normal.cdf(torch.tensor(lo))) / (
                normal.cdf(torch.tensor(hi)) - normal.cdf(torch.tensor(lo)))
            # 100k draws: the empirical CDF's standard error is <= 0.0016
            assert float((log_sigma <= q).double().mean()) == pytest.approx(float(cdf), abs=0.007)


def test_weighting_settings_are_user_errors():
    config = configs.get_config("vp_toy")
    sde = VPSDE()
    config.training.weighting = "snr"
    with pytest.raises(UserError, match="training.weighting"):
        get_loss_fn(config, sde)
    config.training.weighting, config.training.likelihood_weighting = "edm", True
    with pytest.raises(UserError, match="likelihood_weighting"):
        get_loss_fn(config, sde)
    config.training.likelihood_weighting, config.training.proposal = False, "importance"
    with pytest.raises(UserError, match="importance"):
        get_loss_fn(config, sde)
    config.training.weighting, config.training.proposal = "sigma2", "lognormal"
    with pytest.raises(UserError, match="proposal"):
        get_loss_fn(config, sde)
    config.training.proposal = "importance"  # importance sampling of t, which needs the likelihood weighting
    with pytest.raises(UserError, match="needs likelihood weighting"):
        get_loss_fn(config, sde)
    config.training.weighting, config.training.proposal, config.training.p_std = "edm", "auto", 0.0
    with pytest.raises(UserError, match="p_std"):
        get_loss_fn(config, sde)


def test_likelihood_weighting_key_is_the_existing_likelihood_loss():
    sde, x0 = VPSDE(0.1, 20.0), data(1000)
    a, b = configs.get_config("vp_toy"), configs.get_config("vp_toy")
    a.training.weighting = "likelihood"
    b.training.likelihood_weighting = True
    la = get_loss_fn(a, sde)(RING.score_fn(sde), x0, torch.Generator().manual_seed(1))
    lb = get_loss_fn(b, sde)(RING.score_fn(sde), x0, torch.Generator().manual_seed(1))
    plain = get_loss_fn(configs.get_config("vp_toy"), sde)(RING.score_fn(sde), x0, torch.Generator().manual_seed(1))
    assert float(la) == float(lb) and float(la) != pytest.approx(float(plain), rel=0.1)


def test_proposal_importance_is_importance_sampling():
    """training.proposal=importance with the likelihood weighting draws t by importance sampling, exactly as
    training.importance_sampling=true (it was accepted and silently ignored: uniform t)."""
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    score = lambda x, t: -x  # noqa: E731 -- any score: the losses differ only through the drawn t
    losses = {}
    for name, settings in {"uniform": dict(proposal="uniform"), "proposal": dict(proposal="importance"),
                           "flag": dict(proposal="auto", importance_sampling=True)}.items():
        config = configs.get_config("vp_toy")
        config.training.update(weighting="likelihood", **settings)
        loss_fn = get_loss_fn(config, VPSDE())
        losses[name] = float(loss_fn(score, x0, torch.Generator().manual_seed(1)))
    assert losses["proposal"] == losses["flag"] != losses["uniform"]


"""PF-ODE log-likelihood, bits/dim and the DDPM bound against closed forms (exact mixture scores)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from data import GaussianMixture, toy_mixture
from errors import UserError
from likelihood import (bits_per_dim, bpd_offset, ddpm_bound_terms, dequantize, eps_fn_from_score,
                        joint_rms_norm, log_likelihood, logp_to_bpd, mean_and_stderr)
from likelihood.ddpm_bound import DDPMSchedule, discretized_gaussian_nll
from sde_lib import VESDE, VPSDE, subVPSDE

SDES = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE}
EPS = 1e-5


def _exact_prior(mixture, sde):
    """The exact marginal p_T of the mixture, to remove the prior mismatch from the comparison."""
    return lambda z: mixture.marginal_log_prob(z, sde.T, sde)


def _image_score(mixture, sde):
    """Exact score of a D-dim mixture for image-shaped (batch, C, H, W) inputs."""
    return lambda y, t: mixture.marginal_score(y.reshape(y.shape[0], -1), t, sde).reshape(y.shape)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("name,batch", [("ring2d", 32), ("mix64", 12)])
def test_exact_divergence_matches_marginal_log_prob(name, batch, sde_name):
    mixture, sde = toy_mixture(name), SDES[sde_name]()
    x = mixture.sample(batch, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logp, z, nfe = log_likelihood(sde, mixture.score_fn(sde), x, eps=EPS, divergence="exact",
                                  prior_logp=_exact_prior(mixture, sde))
    exact = mixture.marginal_log_prob(x, EPS, sde)
    error = ((logp - exact).abs().mean() / mixture.dim).item()
    # The prior term the test removes: log p_T(z) - log N(z; prior), per dimension.
    mismatch = ((mixture.marginal_log_prob(z, sde.T, sde) - sde.prior_logp(z)).abs().mean() / mixture.dim).item()
    print(f"{name} {sde_name}: |logp - exact| = {error:.2e} nats/dim, prior mismatch {mismatch:.2e} nats/dim, nfe {nfe}")
    assert error < 1e-3
    assert logp.shape == (batch,) and z.shape == x.shape and logp.dtype == torch.float64
    assert nfe > 10
    if sde_name == "vp":
        assert mismatch < 1e-3
        default = log_likelihood(sde, mixture.score_fn(sde), x[:4], eps=EPS, divergence="exact")[0]
        assert ((default - exact[:4]).abs().mean() / mixture.dim).item() < 2e-3


@pytest.mark.parametrize("divergence", ["hutchinson_gaussian", "hutchinson_rademacher"])
@pytest.mark.parametrize("name,repeats", [("ring2d", 200), ("mix64", 100)])
def test_hutchinson_is_unbiased(name, repeats, divergence):
    mixture, sde = toy_mixture(name), VPSDE()
    points = mixture.sample(2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = points.repeat_interleave(repeats, dim=0)  # every copy gets its own probe
    generator = torch.Generator().manual_seed(3)
    logp, _, _ = log_likelihood(sde, mixture.score_fn(sde), x, eps=EPS, divergence=divergence, generator=generator)
    exact, _, _ = log_likelihood(sde, mixture.score_fn(sde), points, eps=EPS, divergence="exact")
    estimates = logp.reshape(2, repeats)
    mean, stderr = estimates.mean(1), estimates.std(1) / math.sqrt(repeats)
    assert (stderr > 0).all()
    assert ((mean - exact).abs() < 4 * stderr + 1e-4).all(), (mean, exact, stderr)
    # Averaging probes reduces the variance (about 1/n_probes).
    many, _, _ = log_likelihood(sde, mixture.score_fn(sde), x, eps=EPS, divergence=divergence, n_probes=8,
                                generator=generator)
    assert (many.reshape(2, repeats).std(1) < 0.6 * estimates.std(1)).all()


def test_probes_are_reproducible_with_a_generator():
    mixture, sde = toy_mixture("ring2d"), VESDE()
    x = mixture.sample(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    runs = [log_likelihood(sde, mixture.score_fn(sde), x, generator=torch.Generator().manual_seed(5))[0]
            for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson_rademacher"])
def test_torchdiffeq_and_scipy_agree(divergence):
    mixture, sde = toy_mixture("ring2d"), subVPSDE()
    x = mixture.sample(16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    results = [log_likelihood(sde, mixture.score_fn(sde), x, eps=EPS, method=method, divergence=divergence,
                              generator=torch.Generator().manual_seed(7)) for method in ("dopri5", "scipy_rk45")]
    (logp_t, z_t, nfe_t), (logp_s, z_s, nfe_s) = results
    assert ((logp_t - logp_s).abs().max() / mixture.dim).item() < 1e-4
    torch.testing.assert_close(z_t, z_s, rtol=1e-3, atol=1e-3)
    assert nfe_s > 10 and nfe_t > 10
    assert logp_s.dtype == torch.float64 and z_s.shape == x.shape
    # With scipy's error norm the batched path takes about the reference's steps.
    logp_r, _, nfe_r = log_likelihood(sde, mixture.score_fn(sde), x, eps=EPS, divergence=divergence,
                                      generator=torch.Generator().manual_seed(7), options={"norm": joint_rms_norm})
    print(f"{divergence}: NFE dopri5 {nfe_t}, dopri5 + RMS norm {nfe_r}, scipy RK45 {nfe_s}")
    assert ((logp_r - logp_s).abs().max() / mixture.dim).item() < 1e-4
    assert abs(nfe_r - nfe_s) <= 0.25 * nfe_s


def test_float32_and_image_shaped_inputs():
    mixture, sde = GaussianMixture([1.0], torch.zeros(1, 12), torch.full((1,), 0.5)), VPSDE()
    x = mixture.sample(8, generator=torch.Generator().manual_seed(8)).reshape(8, 3, 2, 2)
    logp, z, _ = log_likelihood(sde, _image_score(mixture, sde), x, divergence="exact")
    exact = mixture.marginal_log_prob(x.reshape(8, -1).double(), EPS, sde)
    assert logp.dtype == torch.float32 and z.shape == x.shape
    assert ((logp.double() - exact).abs().mean() / 12).item() < 1e-3


def test_offsets_and_conversion():
    assert bpd_offset(2.0) == pytest.approx(7.0) and bpd_offset(1.0) == pytest.approx(8.0)
    # A uniform density on the model range [-1, 1]^D: log p = -D log 2 -> exactly 8 bits/dim.
    assert logp_to_bpd(torch.tensor([-10 * math.log(2.0)]), 10, 2.0).item() == pytest.approx(8.0)
    mean, stderr = mean_and_stderr([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and stderr == pytest.approx(1.0 / math.sqrt(3))


def _discretized_gaussian_case(scale, mean, std, n=48, seed=9):
    """uint8 images k (n, 1, 2, 2) drawn from a Gaussian N(mean, std^2) in the model range, and that Gaussian."""
    a, b = scale
    mixture = GaussianMixture([1.0], torch.full((1, 4), mean), torch.full((1,), std))
    y = mixture.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = torch.clamp(torch.floor(256 * (y - b) / a), 0, 255).to(torch.uint8).reshape(n, 1, 2, 2)
    return mixture, k


@pytest.mark.parametrize("scale,mean,std", [((2.0, -1.0), 0.1, 0.3), ((1.0, 0.0), 0.5, 0.15)])
def test_bits_per_dim_closed_form_discretized_gaussian(scale, mean, std):
    """The dequantized bpd of a Gaussian model approaches -log2 P(k) / D of the discretized Gaussian."""
    a, b = scale
    sde = VPSDE()
    mixture, k = _discretized_gaussian_case(scale, mean, std)
    bpd, nfe = bits_per_dim(sde, _image_score(mixture, sde), k, data_scale=scale, num_dequant=4,
                            generator=torch.Generator().manual_seed(10), dtype=torch.float64, divergence="exact")
    t = torch.tensor(EPS, dtype=torch.float64)  # the model density is p_eps = N(alpha m, alpha^2 s^2 + sigma^2)
    mu = (sde.mean_coeff(t) * mean).item()
    sd = math.sqrt((sde.mean_coeff(t) ** 2 * std ** 2 + sde.marginal_std(t) ** 2).item())
    kk = k.reshape(k.shape[0], -1).double().numpy()
    mass = norm.cdf((a * (kk + 1) / 256 + b - mu) / sd) - norm.cdf((a * kk / 256 + b - mu) / sd)
    closed = -np.log2(mass).sum(1) / 4
    print(f"scale {scale}: bpd {bpd.mean():.5f}, closed form {closed.mean():.5f}, nfe {nfe}")
    assert bpd.shape == (k.shape[0],) and nfe > 0
    assert abs(bpd.mean().item() - closed.mean()) < 2e-3


def test_bits_per_dim_pipeline_matches_direct_computation():
    """Same dequantization draws, exact density: bpd = -(log p(a x + b) + D log a - D log 256) / (D log 2)."""
    scale, sde = (2.0, -1.0), VESDE()
    mixture, k = _discretized_gaussian_case(scale, 0.0, 0.4, n=8)
    bpd, _ = bits_per_dim(sde, _image_score(mixture, sde), k, data_scale=scale, num_dequant=2,
                          generator=torch.Generator().manual_seed(11), dtype=torch.float64, divergence="exact",
                          prior_logp=lambda z: mixture.marginal_log_prob(z.reshape(z.shape[0], -1), sde.T, sde))
    generator = torch.Generator().manual_seed(11)
    logps = [mixture.marginal_log_prob((2.0 * dequantize(k, generator, torch.float64) - 1.0).reshape(8, -1), EPS, sde)
             for _ in range(2)]
    d = 4
    direct = -((logps[0] + logps[1]) / 2 + d * math.log(2.0) - d * math.log(256.0)) / (d * math.log(2.0))
    assert (bpd - direct).abs().max().item() < 1e-4


def test_dequantize_range():
    k = torch.tensor([[0, 255, 17]], dtype=torch.uint8)
    x = dequantize(k, torch.Generator().manual_seed(0), torch.float64)
    assert ((x >= k / 256) & (x < (k.double() + 1) / 256)).all()


def test_bits_per_dim_input_errors():
    sde, mixture = VPSDE(), toy_mixture("ring2d")
    score = mixture.score_fn(sde)
    with pytest.raises(UserError, match="8-bit"):
        bits_per_dim(sde, score, torch.rand(4, 2))  # already scaled floats
    with pytest.raises(UserError, match="0..255"):
        bits_per_dim(sde, score, torch.tensor([[0, 300]]))
    with pytest.raises(UserError, match="0..255"):
        bits_per_dim(sde, score, np.array([[-1, 3]]))
    with pytest.raises(UserError, match="num_dequant"):
        bits_per_dim(sde, score, torch.zeros(2, 2, dtype=torch.uint8), num_dequant=0)
    with pytest.raises(UserError, match="scale"):
        bits_per_dim(sde, score, torch.zeros(2, 2, dtype=torch.uint8), data_scale=(0.0, 0.0))


def test_log_likelihood_input_errors():
    sde, mixture = VPSDE(), toy_mixture("ring2d")
    score = mixture.score_fn(sde)
    x = torch.zeros(3, 2, dtype=torch.float64)
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(UserError, match="NaN or infinite"):
        log_likelihood(sde, score, bad)
    bad[1, 0] = float("inf")
    with pytest.raises(UserError, match="NaN or infinite"):
        log_likelihood(sde, score, bad)
    with pytest.raises(UserError, match="floating-point"):
        log_likelihood(sde, score, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(UserError, match="divergence"):
        log_likelihood(sde, score, x, divergence="hutchinson")
    with pytest.raises(UserError, match="ODE method"):
        log_likelihood(sde, score, x, method="rk45")
    with pytest.raises(UserError, match="eps"):
        log_likelihood(sde, score, x, eps=0.0)
    with pytest.raises(UserError, match="n_probes"):
        log_likelihood(sde, score, x, n_probes=0)


# --- DDPM variational bound ------------------------------------------------------------------------

def _point_mass_oracle(schedule, x0):
    """The optimal noise prediction when the data is the single image x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    def eps_fn(x, i):
        abar = schedule.abar[i + 1].view(-1, 1, 1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    return eps_fn


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_ddpm_bound_closed_form_with_oracle(variance):
    """With the exact eps of a point mass, mu_theta = mu~: the bound is deterministic and closed form."""
    sde = VPSDE(N=100)
    images = torch.tensor([0, 255, 128, 7, 200, 255, 0, 64], dtype=torch.uint8).reshape(2, 1, 2, 2)
    x0 = 2 * images.double() / 255 - 1
    schedule = DDPMSchedule(sde)
    terms = ddpm_bound_terms(sde, _point_mass_oracle(schedule, x0), images, variance=variance,
                             generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    d = 4
    # L_{t-1} = KL(N(mu~, beta~) || N(mu~, sigma_t^2)) = D/2 (r - 1 - log r), r = beta~_t / sigma_t^2
    t = torch.arange(2, sde.N + 1)
    sigma2 = schedule.betas[t] if variance == "fixedlarge" else schedule.posterior_var[t]
    r = schedule.posterior_var[t] / sigma2
    kl = (d / 2 * (r - 1 - torch.log(r))).sum()
    torch.testing.assert_close(terms["kl"], kl.expand(2), rtol=1e-6, atol=1e-9)
    abar_t = schedule.abar[sde.N]
    prior = 0.5 * ((abar_t * x0 ** 2).flatten(1).sum(1) + d * (1 - abar_t) - d - d * torch.log(1 - abar_t))
    torch.testing.assert_close(terms["prior"], prior, rtol=1e-6, atol=1e-12)
    # Decoder: mean exactly x0, std sqrt(beta~_2); bins of half-width 1/255, open at the edges 0 and 255.
    h = (1 / 255) / math.sqrt(schedule.posterior_var[2].item())
    interior, edge = -math.log(2 * norm.cdf(h) - 1), -math.log(norm.cdf(h))
    k = images.reshape(2, -1).numpy()
    decoder = np.where((k == 0) | (k == 255), edge, interior).sum(1)
    torch.testing.assert_close(terms["decoder"], torch.from_numpy(decoder), rtol=1e-6, atol=1e-8)
    # An unbiased subset of the KL terms has the same value here (every term is deterministic).
    subset = ddpm_bound_terms(sde, _point_mass_oracle(schedule, x0), images, variance=variance, num_terms=5,
                              generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    if variance == "fixedsmall":
        torch.testing.assert_close(subset["kl"], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-10)


def test_ddpm_bound_upper_bounds_discrete_nll():
    """Gaussian data with the exact score of the discrete chain: the bound lies above -log P(k) and near it."""
    sde = VPSDE(N=200)
    scale = (2.0, -1.0)
    mixture, k = _discretized_gaussian_case(scale, 0.0, 0.3, n=32)
    schedule = DDPMSchedule(sde)

    def eps_fn(x, i):  # exact eps of q(x_t) = N(0, abar s^2 + 1 - abar) under the DDPM chain
        abar = schedule.abar[i + 1].view(-1, 1, 1, 1)
        return x * (1 - abar).sqrt() / (abar * 0.3 ** 2 + 1 - abar)

    terms = ddpm_bound_terms(sde, eps_fn, k, data_scale=scale, generator=torch.Generator().manual_seed(14),
                             dtype=torch.float64)
    x0 = 2 * k.reshape(k.shape[0], -1).double().numpy() / 255 - 1
    upper = np.where(k.reshape(k.shape[0], -1).numpy() == 255, np.inf, (x0 + 1 / 255) / 0.3)
    lower = np.where(k.reshape(k.shape[0], -1).numpy() == 0, -np.inf, (x0 - 1 / 255) / 0.3)
    nll = -np.log(norm.cdf(upper) - norm.cdf(lower)).sum(1)
    bound, nll = terms["total"].mean().item(), nll.mean()
    print(f"DDPM bound {bound / 4 / math.log(2):.4f} bits/dim vs true {nll / 4 / math.log(2):.4f}")
    assert nll - 0.05 < bound < nll + 0.5 * 4 * math.log(2)


def test_eps_fn_from_score_and_errors():
    sde = VPSDE(N=50)
    mixture = GaussianMixture([1.0], torch.zeros(1, 2), torch.full((1,), 0.5))
    eps_fn = eps_fn_from_score(sde, mixture.score_fn(sde))
    x = torch.randn(3, 2, dtype=torch.float64)
    i = torch.tensor([0, 10, 49])
    t = i.double() / 49
    std = torch.sqrt(1 - DDPMSchedule(sde).abar[i + 1])
    torch.testing.assert_close(eps_fn(x, i), -std[:, None] * mixture.marginal_score(x, t, sde))
    with pytest.raises(UserError, match="VP SDE"):
        ddpm_bound_terms(VESDE(), eps_fn, torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(UserError, match="VP SDE"):
        ddpm_bound_terms(subVPSDE(), eps_fn, torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(UserError, match="variance"):
        ddpm_bound_terms(sde, eps_fn, torch.zeros(1, 1, 2, 2, dtype=torch.uint8), variance="learned")
    with pytest.raises(UserError, match="8-bit"):
        ddpm_bound_terms(sde, eps_fn, torch.zeros(1, 1, 2, 2))


def test_discretized_gaussian_decoder_sums_to_one():
    """The decoder's masses over all 256 levels of one pixel sum to 1."""
    levels = torch.arange(256, dtype=torch.float64).reshape(256, 1)
    x0 = 2 * levels / 255 - 1
    mean = torch.full_like(x0, 0.3)
    nll = discretized_gaussian_nll(x0, mean, torch.full((256,), 0.05 ** 2, dtype=torch.float64),
                                   half_width=1 / 255, low=-1.0, high=1.0)
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.gpu
def test_log_likelihood_on_cuda_matches_cpu():
    mixture, sde = toy_mixture("ring2d"), VPSDE()
    x = mixture.sample(64, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    cpu, _, _ = log_likelihood(sde, mixture.score_fn(sde), x, divergence="exact")
    gpu, z, _ = log_likelihood(sde, mixture.score_fn(sde), x.cuda(), divergence="exact")
    assert z.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
    generator = torch.Generator(device="cuda").manual_seed(0)
    est, _, _ = log_likelihood(sde, mixture.score_fn(sde), x.cuda().float(), generator=generator)
    assert est.is_cuda and est.dtype == torch.float32 and torch.isfinite(est).all()


# --- the likelihood runner -------------------------------------------------------------------------

def test_runner_toy_report_matches_exact_density():
    """With the exact score, the runner's nats/dim on the toy split equals the exact -log p_eps of those points."""
    import configs
    from evaluation.likelihood_runner import evaluate, format_report

    config = configs.get_config("ve_toy")
    config.likelihood.divergence = "exact"
    config.likelihood.batch_size = 16
    sde = VESDE(config.sde.sigma_min, config.sde.sigma_max, config.sde.num_scales)
    mixture = toy_mixture(config.data.dataset)
    report = evaluate(config, sde, mixture.score_fn(sde), "test", 2, torch.device("cpu"), progress=False)
    assert report["num_samples"] == 32 and report["dequantized"] is False
    assert abs(report["nats_per_dim"] - report["exact_nats_per_dim"]) < 1e-3
    assert report["bits_per_dim"] == pytest.approx(report["nats_per_dim"] / math.log(2))
    assert report["mean_nfe"] > 10 and report["samples_per_s"] > 0
    assert "bits/dim" in format_report(report)
    with pytest.raises(UserError, match="split"):
        evaluate(config, sde, mixture.score_fn(sde), "validation", 1, torch.device("cpu"), progress=False)


def test_runner_image_split_bits_per_dim():
    """Digits (8x8, 8-bit) under a per-pixel Gaussian with its exact score: bpd matches the closed-form bound."""
    import configs
    from data.digits import load_digits_uint8
    from evaluation.likelihood_runner import evaluate

    config = configs.get_config("vp_toy")
    config.data.update(dataset="digits", kind="image", image_size=8, num_channels=1, centered=True)
    config.likelihood.update(divergence="exact", batch_size=6, num_dequant=1)
    sde = VPSDE()
    images, _ = load_digits_uint8()
    y = 2 * torch.from_numpy(images[:500]).double().reshape(500, -1) / 255 - 1
    mixture = GaussianMixture([1.0], y.mean(0, keepdim=True), y.std(0).clamp(min=0.05)[None])
    report = evaluate(config, sde, _image_score(mixture, sde), "test", 1, torch.device("cpu"), progress=False)
    assert report["num_samples"] == 6 and report["dim"] == 64 and report["dequantized"] is True
    # Same images, exact density at eps and 7 bits/dim offset; dequantization noise is the only difference.
    k = torch.from_numpy(images[:6]).double().reshape(6, -1)
    direct = -mixture.marginal_log_prob(2 * (k + 0.5) / 256 - 1, EPS, sde) / (64 * math.log(2)) + 7.0
    print(f"digits: runner {report['bits_per_dim']:.4f} bits/dim, mid-bin direct {direct.mean().item():.4f}")
    assert abs(report["bits_per_dim"] - direct.mean().item()) < 5e-3
    assert report["images_per_s"] > 0 and report["bits_per_dim_stderr"] > 0
    # The DDPM bound next to it (discrete-time VP); a few KL terms per image give an unbiased estimate.
    config.training.continuous = False
    config.likelihood.update(ddpm_bound=True, ddpm_num_terms=4, batch_size=4)
    report = evaluate(config, sde, _image_score(mixture, sde), "test", 1, torch.device("cpu"), progress=False)
    print(f"digits: DDPM bound {report['ddpm_bound_bits_per_dim']:.3f} vs ODE {report['bits_per_dim']:.3f} bits/dim")
    # A different model (discrete decoder with open edge bins, which digits' many 0 pixels favour): only sane.
    assert 0.0 < report["ddpm_bound_bits_per_dim"] < report["bits_per_dim"] + 2.0
    config.sde.name = "vesde"
    with pytest.raises(UserError, match="discrete time"):
        evaluate(config, VESDE(), _image_score(mixture, VESDE()), "test", 1, torch.device("cpu"), progress=False)


def test_cli_writes_json_next_to_checkpoint(tmp_path):
    """`main.py --mode likelihood` on a (randomly initialised) checkpoint prints bits/dim and writes the JSON."""
    import json

    from training import checkpoint

    import configs
    import main
    import models

    config = configs.get_config("vp_toy")
    model = models.create_model(config)
    ema = models.ExponentialMovingAverage(model, config.model.ema_rate)
    state = {"format": checkpoint.FORMAT_VERSION, "model": model.state_dict(), "ema": ema.state_dict(),
             "optimizer": {}, "step": 3, "config": checkpoint.config_to_json(config)}
    checkpoint.save_checkpoint(checkpoint.checkpoint_path(str(tmp_path)), state)
    code = main.main(["--mode", "likelihood", "--config", "vp_toy", "--workdir", str(tmp_path), "--num_batches", "1",
                      "--config.likelihood.batch_size=8", "--config.device=cpu"])
    assert code == 0
    report = json.loads((tmp_path / "checkpoints" / "likelihood_test.json").read_text())
    assert report["num_samples"] == 8 and report["step"] == 3 and math.isfinite(report["bits_per_dim"])
    assert main.main(["--mode", "likelihood", "--config", "vp_toy", "--workdir", str(tmp_path / "none")]) == 2


@pytest.mark.gpu
def test_bits_per_dim_and_scipy_path_on_cuda():
    scale, sde = (2.0, -1.0), VPSDE()
    mixture, k = _discretized_gaussian_case(scale, 0.0, 0.4, n=32)
    generator = torch.Generator(device="cuda").manual_seed(0)
    bpd, _ = bits_per_dim(sde, _image_score(mixture, sde), k.cuda(), data_scale=scale, generator=generator,
                          dtype=torch.float64, divergence="exact")
    cpu, _ = bits_per_dim(sde, _image_score(mixture, sde), k, data_scale=scale,
                          generator=torch.Generator().manual_seed(0), dtype=torch.float64, divergence="exact")
    assert bpd.is_cuda and abs(bpd.mean().item() - cpu.mean().item()) < 0.05  # different dequantization draws
    x = 2 * dequantize(k, dtype=torch.float64) - 1
    ref, _, _ = log_likelihood(sde, _image_score(mixture, sde), x, divergence="exact", method="scipy_rk45")
    gpu, _, _ = log_likelihood(sde, _image_score(mixture, sde), x.cuda(), divergence="exact", method="scipy_rk45")
    torch.testing.assert_close(gpu.cpu(), ref, rtol=1e-6, atol=1e-5)

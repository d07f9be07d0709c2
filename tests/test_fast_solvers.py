"""Fast samplers (DDIM, Heun, DPM-Solver, adaptive) against exact scores, closed-form flows and reference ODE solves."""
import math

import pytest
import torch
from torchdiffeq import odeint

import solvers
from data import toy_mixture
from data.mixtures import GaussianMixture
from errors import UserError
from evaluation.metrics import sliced_wasserstein
from sde_lib import VESDE, VPSDE, subVPSDE
from solvers.common import CountingScore
from solvers.ddim import ddim_coefficients
from solvers.dpm_solver import singlestep_orders
from solvers.registry import SAMPLERS
from solvers.timesteps import (SCHEDULES, edm_sigma, log_snr, time_grid, time_of_log_snr,
                               time_of_log_snr_bisection)

FIXED_STEP = ["ddim", "heun", "dpm2", "dpm3", "dpm2m", "dpm3m", "dpmpp2m", "dpmpp3m"]
EPS = 1e-3


def run(name, sde, score_fn, x_T, nfe, seed=0, **options):
    """Call a registered sampler directly with a seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    return SAMPLERS[name](sde, score_fn, tuple(x_T.shape), nfe=nfe, eps=EPS, x_T=x_T, generator=gen, **options)


def sliced_w2(x, y):
    """SW-2 with 64 fixed directions (the same for every comparison)."""
    return sliced_wasserstein(x, y, n_projections=64, generator=torch.Generator().manual_seed(0))


def gaussian_flow(sde, target: GaussianMixture, x_T, t_end=EPS):
    """Exact PF-ODE map T -> t_end for a one-component (diagonal Gaussian) target.

    With p_t = N(alpha mu, alpha^2 s^2 + sigma^2), (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) is constant
    along the probability-flow ODE of any linear SDE (its drift is linear in x).
    """
    mu, s = target.means[0], target.stds[0]

    def moments(t):
        t = torch.tensor(t, dtype=torch.float64)
        a, sig = sde.mean_coeff(t), sde.marginal_std(t)
        return a * mu, torch.sqrt(a ** 2 * s ** 2 + sig ** 2)

    (m_T, sd_T), (m_e, sd_e) = moments(sde.T), moments(t_end)
    return m_e + sd_e / sd_T * (x_T - m_T)


# --- time maps and schedules ------------------------------------------------------------


@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_log_snr_inverse_closed_form_and_bisection(sde):
    t = torch.tensor([1e-5, 1e-3, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    lam = log_snr(sde, t)
    assert (lam[1:] < lam[:-1]).all()
    assert torch.allclose(time_of_log_snr(sde, lam), t, rtol=1e-9, atol=1e-12)
    assert torch.allclose(time_of_log_snr_bisection(sde, lam), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_time_grids(sde, schedule):
    n = 12
    grid = time_grid(sde, n, EPS, schedule)
    assert grid.shape == (n + 1,) and grid[0] == sde.T and grid[-1] == EPS
    assert (grid[1:] < grid[:-1]).all()
    if schedule == "logsnr":
        steps = log_snr(sde, grid).diff()
        assert torch.allclose(steps, steps.mean().expand(n), rtol=1e-8)
    if schedule == "karras":  # Karras et al. eq. 5 with rho = 7: sigma^(1/7) equally spaced
        steps = (edm_sigma(sde, grid) ** (1 / 7)).diff()
        assert torch.allclose(steps, steps.mean().expand(n), rtol=1e-8)
    if schedule == "uniform":
        assert torch.allclose(grid.diff(), grid.diff().mean().expand(n))


# --- DDIM ---------------------------------------------------------------------------------


def test_ddim_eta1_variance_is_ddpm_beta_tilde():
    """Per step on a 1000-step grid, DDIM's eta=1 variance is DDPM's posterior variance (Ho et al. eq. 7)."""
    sde = VPSDE()
    grid = torch.linspace(1.0, EPS, 1001, dtype=torch.float64)
    abar = sde.mean_coeff(grid) ** 2  # abar_t = alpha(t)^2
    abar_t, abar_s = abar[:-1], abar[1:]
    beta = 1.0 - abar_t / abar_s
    beta_tilde = (1.0 - abar_s) / (1.0 - abar_t) * beta
    *_, noise_std = ddim_coefficients(sde, grid[:-1], grid[1:], eta=1.0)
    assert torch.allclose(noise_std ** 2, beta_tilde, rtol=1e-9)
    *_, zero = ddim_coefficients(sde, grid[:-1], grid[1:], eta=0.0)
    assert (zero == 0).all()


@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE()], ids=["vp", "subvp"])
def test_ddim_eta1_step_samples_the_posterior(sde):
    """One eta=1 step t -> s from a fixed x_t: sample mean and variance of q(x_s | x_t, x0_hat) (joint Gaussian)."""
    mixture = toy_mixture("ring2d")
    score_fn = mixture.score_fn(sde)
    n, s = 4000, 0.25  # one step from t = T = 1 to s (the sampler's end time eps = s)
    x_t = torch.tensor([[0.7, -0.4]], dtype=torch.float64).expand(n, 2).contiguous()
    gen = torch.Generator().manual_seed(1)
    x_s, used = SAMPLERS["ddim"](sde, score_fn, x_t.shape, nfe=1, eps=s, x_T=x_t, generator=gen, eta=1.0)
    assert used == 1
    tt, ss = torch.tensor(sde.T, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    a_t, sig_t, a_s, sig_s = sde.mean_coeff(tt), sde.marginal_std(tt), sde.mean_coeff(ss), sde.marginal_std(ss)
    x0_hat = (x_t[:1] + sig_t ** 2 * score_fn(x_t[:1], tt.expand(1))) / a_t
    # Joint Gaussian of (x_s, x_t) given x0: Cov(x_s, x_t) = (a_t / a_s) sig_s^2.
    gain = (a_t / a_s) * sig_s ** 2 / sig_t ** 2
    mean = a_s * x0_hat + gain * (x_t[:1] - a_t * x0_hat)
    var = sig_s ** 2 - gain * (a_t / a_s) * sig_s ** 2
    assert torch.allclose(x_s.mean(0), mean[0], atol=4 * var.sqrt().item() / math.sqrt(n))
    assert torch.allclose(x_s.var(0), var.expand(2), rtol=0.1)


@pytest.fixture(scope="module")
def ring_reference():
    """Fine rk4 solve (torchdiffeq, 200 steps; error ~1e-6) of the VP PF-ODE from fixed x_T on the ring."""
    sde, mixture = VPSDE(), toy_mixture("ring2d")
    x_T = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    flow = sde.reverse(mixture.score_fn(sde), probability_flow=True)
    times = torch.tensor([sde.T, EPS], dtype=torch.float64)
    ref = odeint(lambda t, x: flow.sde(x, t)[0], x_T, times, method="rk4", options={"step_size": 1 / 200})[-1]
    return sde, mixture.score_fn(sde), x_T, ref


def test_ddim_eta0_converges_to_probability_flow(ring_reference):
    sde, score_fn, x_T, ref = ring_reference
    err = {n: (run("ddim", sde, score_fn, x_T, n)[0] - ref).abs().max().item() for n in (50, 500)}
    assert err[500] < 1e-2  # measured 5.7e-3
    assert err[50] / err[500] > 7  # first order: ~10x for 10x the steps (measured 9.4)


def test_ddim_eta0_is_deterministic_and_heun_euler_stage_equals_it():
    sde, mixture = VPSDE(), toy_mixture("ring2d")
    score_fn = mixture.score_fn(sde)
    x_T = sde.prior_sampling((16, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, _ = run("ddim", sde, score_fn, x_T, 1, seed=1)
    b, _ = run("ddim", sde, score_fn, x_T, 1, seed=2)
    assert torch.equal(a, b)
    # One Euler step in (sigma_edm, x / alpha) is the DDIM map (and DPM-Solver-1 = the first multistep step).
    euler, used = run("heun", sde, score_fn, x_T, 1, schedule="uniform")
    assert used == 1 and torch.allclose(euler, a, atol=1e-10)
    first, _ = run("dpm2m", sde, score_fn, x_T, 1)
    assert torch.allclose(first, a, atol=1e-10)


# --- convergence orders ---------------------------------------------------------------------

GAUSSIAN = GaussianMixture([1.0], [[1.5, -0.5]], [[0.3, 0.6]])
ORDER_CASES = [  # (sampler, sde, options, nfe, order); nfe -> 2 nfe doubles the number of steps
    ("ddim", VPSDE(), {}, 40, 1),
    ("ddim", subVPSDE(), {}, 40, 1),
    ("heun", VPSDE(), {}, 40, 2),
    ("heun", VESDE(), {}, 40, 2),
    ("heun", VPSDE(), {"variable": "t", "schedule": "uniform"}, 40, 2),
    ("dpm2", VPSDE(), {}, 40, 2),
    ("dpm2", subVPSDE(), {}, 40, 2),
    ("dpm3", VPSDE(), {}, 30, 3),
    ("dpm3", subVPSDE(), {}, 30, 3),
    ("dpm3", VPSDE(), {"schedule": "quadratic"}, 120, 3),  # time-uniform steps: pre-asymptotic up to n >> 1/eps
    ("dpm2m", VPSDE(), {}, 40, 2),
    ("dpm3m", VPSDE(), {}, 40, 3),
    ("dpmpp2m", subVPSDE(), {}, 40, 2),
    ("dpmpp3m", VPSDE(), {}, 40, 3),
]


@pytest.mark.parametrize("name,sde,options,nfe,order", ORDER_CASES,
                         ids=[f"{c[0]}-{type(c[1]).__name__}-{'-'.join(map(str, c[2].values())) or 'default'}"
                              for c in ORDER_CASES])
def test_convergence_order_on_exact_gaussian_flow(name, sde, options, nfe, order):
    """Error against the closed-form PF-ODE map drops ~2^order when the steps double."""
    x_T = sde.prior_sampling((64, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = gaussian_flow(sde, GAUSSIAN, x_T)
    score_fn = GAUSSIAN.score_fn(sde)
    coarse = (run(name, sde, score_fn, x_T, nfe, **options)[0] - exact).abs().max().item()
    fine = (run(name, sde, score_fn, x_T, 2 * nfe, **options)[0] - exact).abs().max().item()
    ratio = coarse / fine
    assert 0.75 * 2 ** order < ratio < 2.5 * 2 ** order, (coarse, fine, ratio)


@pytest.mark.parametrize("name,nfe,min_ratio", [("dpm2", 80, 2.5), ("dpm3", 60, 5.0), ("dpmpp3m", 80, 5.0)])
def test_dpm_solver_order_on_ring_mixture(ring_reference, name, nfe, min_ratio):
    """Same check on the 8-mode ring against the rk4 reference (pre-asymptotic: measured 3.2 / 6.3 / 7.7)."""
    sde, score_fn, x_T, ref = ring_reference
    coarse = (run(name, sde, score_fn, x_T, nfe)[0] - ref).abs().max().item()
    fine = (run(name, sde, score_fn, x_T, 2 * nfe)[0] - ref).abs().max().item()
    assert fine < 3e-3 and coarse / fine > min_ratio, (coarse, fine)


# --- sample quality against the exact distribution -------------------------------------------

QUALITY_CASES = [  # (target, n, sde, sampler, options, small nfe, large nfe)
    ("ring2d", 2000, VPSDE(), "ddim", {}, 3, 100),
    ("ring2d", 2000, VPSDE(), "ddim", {"eta": 1.0}, 3, 100),
    ("ring2d", 2000, VPSDE(), "heun", {}, 10, 61),
    ("ring2d", 2000, VPSDE(), "dpm2", {}, 10, 60),
    ("ring2d", 2000, VPSDE(), "dpm3", {}, 6, 60),
    ("ring2d", 2000, VPSDE(), "dpm2m", {}, 3, 30),
    ("ring2d", 2000, VPSDE(), "dpm3m", {}, 2, 30),
    ("ring2d", 2000, VPSDE(), "dpmpp2m", {}, 4, 30),
    ("ring2d", 2000, VPSDE(), "dpmpp3m", {}, 4, 30),
    ("ring2d", 2000, subVPSDE(), "dpm3m", {}, 4, 30),
    ("ring2d", 2000, VESDE(), "heun", {}, 10, 61),
    ("mix64", 400, VPSDE(), "ddim", {}, 3, 60),
    ("mix64", 400, VPSDE(), "heun", {}, 10, 61),
    ("mix64", 400, VPSDE(), "dpm3", {}, 6, 60),
    ("mix64", 400, VPSDE(), "dpm2m", {}, 4, 30),
    ("mix64", 400, VPSDE(), "dpmpp3m", {}, 4, 30),
]


def _target(name, n):
    """Exact reference samples and the SW-2 noise floor: the largest distance of 3 more exact sets of size n."""
    mixture = toy_mixture(name)
    gen = torch.Generator().manual_seed(11)
    ref = mixture.sample(n, generator=gen, dtype=torch.float64)
    floor = max(sliced_w2(mixture.sample(n, generator=gen, dtype=torch.float64), ref) for _ in range(3))
    return mixture, ref, floor


@pytest.mark.parametrize("target,n,sde,name,options,small,large", QUALITY_CASES,
                         ids=[f"{c[0]}-{type(c[2]).__name__}-{c[3]}{'-eta1' if c[4] else ''}" for c in QUALITY_CASES])
def test_error_falls_with_nfe_to_noise_floor(target, n, sde, name, options, small, large):
    mixture, ref, floor = _target(target, n)
    x_T = sde.prior_sampling((n, mixture.dim), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    score_fn = mixture.score_fn(sde)
    err_small = sliced_w2(run(name, sde, score_fn, x_T, small, **options)[0], ref)
    err_large = sliced_w2(run(name, sde, score_fn, x_T, large, **options)[0], ref)
    assert err_large < 1.25 * floor, (err_large, floor)  # floors measured 0.06-0.09 (ring), 0.10-0.18 (mix64)
    assert err_small > 1.8 * err_large, (err_small, err_large)


def test_adaptive_error_falls_as_tolerance_tightens():
    sde = VPSDE()
    mixture, ref, floor = _target("ring2d", 2000)
    x_T = sde.prior_sampling((2000, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    score_fn = mixture.score_fn(sde)
    loose, nfe_loose = run("adaptive", sde, score_fn, x_T, None, rtol=0.5, atol=0.05)
    tight, nfe_tight = run("adaptive", sde, score_fn, x_T, None, rtol=0.1)
    assert nfe_tight > 2 * nfe_loose  # measured 54 -> 162
    err_loose, err_tight = sliced_w2(loose, ref), sliced_w2(tight, ref)
    # measured 0.143 -> 0.083 against a floor of 0.105
    assert err_tight < 1.25 * floor and err_loose > 1.3 * err_tight, (err_loose, err_tight, floor)


@pytest.mark.parametrize("noise,max_bias", [("bridge", 0.05), ("fresh", 0.2)])
def test_adaptive_on_ve_ring_radius(noise, max_bias):
    """Mean radius of VE adaptive samples (measured bias 0.017 bridge, 0.11 fresh: see the module docstring)."""
    sde, mixture = VESDE(), toy_mixture("ring2d")
    x_T = sde.prior_sampling((500, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x, _ = run("adaptive", sde, mixture.score_fn(sde), x_T, None, noise=noise, rtol=0.05)
    exact = mixture.sample(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bias = (x.norm(dim=1).mean() - exact.norm(dim=1).mean()).abs().item()
    assert bias < max_bias


# --- NFE accounting, reproducibility, dtype ----------------------------------------------------


def test_singlestep_orders_spend_the_budget():
    assert singlestep_orders(6, 3) == [3, 3]
    assert singlestep_orders(7, 3) == [3, 3, 1]
    assert singlestep_orders(8, 3) == [3, 3, 2]
    assert singlestep_orders(5, 2) == [2, 2, 1]
    assert singlestep_orders(1, 3) == [1]


@pytest.mark.parametrize("name", FIXED_STEP)
def test_fixed_step_samplers_count_every_evaluation(name):
    sde, mixture = VPSDE(), toy_mixture("ring2d")
    x_T = sde.prior_sampling((8, 2), generator=torch.Generator().manual_seed(0))
    for nfe in (1, 2, 3, 4, 5, 7, 8, 11):
        counter = CountingScore(mixture.score_fn(sde))
        x, used = solvers.sample(sde, counter, x_T.shape, solver=name, nfe=nfe, x_T=x_T,
                                 generator=torch.Generator().manual_seed(0))
        assert counter.calls == used == nfe, (nfe, counter.calls, used)
        assert x.shape == x_T.shape and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_adaptive_counts_every_trial_and_is_reproducible():
    sde, mixture = VPSDE(), toy_mixture("ring2d")
    counter = CountingScore(mixture.score_fn(sde))
    a, used = solvers.sample(sde, counter, (64, 2), solver="adaptive", generator=torch.Generator().manual_seed(4))
    assert counter.calls == used and used % 2 == 0 and used > 0
    b, _ = solvers.sample(sde, mixture.score_fn(sde), (64, 2), solver="adaptive",
                          generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_stochastic_samplers_follow_the_generator():
    sde, mixture = subVPSDE(), toy_mixture("ring2d")
    x_T = sde.prior_sampling((16, 2), generator=torch.Generator().manual_seed(0))
    a, _ = run("ddim", sde, mixture.score_fn(sde), x_T, 10, seed=1, eta=1.0)
    b, _ = run("ddim", sde, mixture.score_fn(sde), x_T, 10, seed=1, eta=1.0)
    c, _ = run("ddim", sde, mixture.score_fn(sde), x_T, 10, seed=2, eta=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "dpm2", "dpm3", "dpm2m", "dpm3m", "dpmpp2m", "dpmpp3m"])
def test_vp_only_samplers_refuse_ve(name):
    sde = VESDE()
    with pytest.raises(UserError, match="not valid for VESDE"):
        solvers.sample(sde, toy_mixture("ring2d").score_fn(sde), (4, 2), solver=name, nfe=10)


@pytest.mark.parametrize("name", FIXED_STEP + ["adaptive"])
@pytest.mark.parametrize("nfe", [0, -3])
def test_non_positive_nfe_is_refused(name, nfe):
    sde = VPSDE()
    score_fn = toy_mixture("ring2d").score_fn(sde)
    with pytest.raises(UserError, match="nfe"):
        solvers.sample(sde, score_fn, (4, 2), solver=name, nfe=nfe)
    with pytest.raises(UserError, match="nfe"):  # the sampler itself checks too, not only the entry point
        SAMPLERS[name](sde, score_fn, (4, 2), nfe=nfe, eps=EPS, x_T=None, generator=None)


@pytest.mark.parametrize("name,options,match", [
    ("ddim", {"eta": 1.5}, "eta"),
    ("ddim", {"schedule": "cosine"}, "schedule"),
    ("heun", {"variable": "lambda"}, "variable"),
    ("dpm3", {"schedule": "linear"}, "schedule"),
    ("adaptive", {"rtol": -0.1}, "rtol"),
    ("adaptive", {"noise": "pink"}, "noise"),
])
def test_bad_options_are_user_errors(name, options, match):
    sde = VPSDE()
    with pytest.raises(UserError, match=match):
        solvers.sample(sde, toy_mixture("ring2d").score_fn(sde), (4, 2), solver=name, nfe=10, **options)


def test_bad_eps_and_exhausted_adaptive_budget():
    sde = VPSDE()
    score_fn = toy_mixture("ring2d").score_fn(sde)
    with pytest.raises(UserError, match="eps"):
        solvers.sample(sde, score_fn, (4, 2), solver="dpm2", nfe=10, eps=0.0)
    with pytest.raises(UserError, match="at least 2"):
        solvers.sample(sde, score_fn, (4, 2), solver="adaptive", nfe=1)


@pytest.mark.parametrize("cap", [2, 5, 6, 50])
def test_adaptive_cap_is_never_exceeded(cap):
    """A cap too small for the tolerance still returns finite samples: the last affordable trial covers the rest
    of [eps, T] (accepted whatever its error); a cap above what the tolerance needs changes nothing."""
    sde = VPSDE()
    score_fn = lambda x, t: -x  # noqa: E731  (the exact score of N(0, I), stationary under VP)
    x, used = solvers.sample(sde, score_fn, (2000, 2), solver="adaptive", nfe=cap, rtol=1e-4,
                             generator=torch.Generator().manual_seed(0))
    assert used == 2 * (cap // 2) and torch.isfinite(x).all()
    free, free_used = solvers.sample(sde, score_fn, (2000, 2), solver="adaptive", rtol=1e-2,
                                     generator=torch.Generator().manual_seed(0))
    capped, capped_used = solvers.sample(sde, score_fn, (2000, 2), solver="adaptive", nfe=free_used + 4, rtol=1e-2,
                                         generator=torch.Generator().manual_seed(0))
    assert capped_used == free_used and torch.equal(free, capped)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FIXED_STEP + ["adaptive"])
def test_cuda_matches_cpu(name):
    sde, mixture = VPSDE(), toy_mixture("ring2d")
    x_T = sde.prior_sampling((256, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    options = {"rtol": 0.02} if name == "adaptive" else {}
    cpu, used_cpu = SAMPLERS[name](sde, mixture.score_fn(sde), x_T.shape, nfe=None if name == "adaptive" else 20,
                                   eps=EPS, x_T=x_T, generator=torch.Generator().manual_seed(1), **options)
    cuda, used_cuda = SAMPLERS[name](sde, mixture.score_fn(sde), x_T.shape, nfe=None if name == "adaptive" else 20,
                                     eps=EPS, x_T=x_T.cuda(), generator=torch.Generator("cuda").manual_seed(1),
                                     **options)
    assert cuda.device.type == "cuda" and cuda.dtype == torch.float64
    if name != "adaptive":  # the adaptive path draws its noise on the GPU generator: compare in distribution
        assert used_cpu == used_cuda and torch.allclose(cuda.cpu(), cpu, atol=1e-6)
    else:
        assert abs(cuda.norm(dim=1).mean().item() - cpu.norm(dim=1).mean().item()) < 0.1

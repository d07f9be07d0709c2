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
from sde_lib import EDMSDE, VESDE, VPSDE, subVPSDE
from solvers.brownian import BrownianMemory
from solvers.common import CountingScore
from solvers.ddim import ddim_coefficients
from solvers.dpm_solver import multistep_orders, singlestep_orders
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


@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE(), VESDE(), EDMSDE()], ids=["vp", "subvp", "ve", "edm"])
def test_log_snr_inverse_closed_form_and_bisection(sde):
    t = sde.T * torch.tensor([1e-5, 1e-3, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    lam = log_snr(sde, t)
    assert (lam[1:] < lam[:-1]).all()
    assert torch.allclose(time_of_log_snr(sde, lam), t, rtol=1e-9, atol=1e-12)
    assert torch.allclose(time_of_log_snr_bisection(sde, lam), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE(), VESDE(), EDMSDE()], ids=["vp", "subvp", "ve", "edm"])
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


@pytest.mark.parametrize("eta", [0.5, 0.8])
def test_ddim_intermediate_eta_step_is_eq_12(eta):
    """One step t -> s at 0 < eta < 1 (DDIM eq. 12): mean alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat and variance
    c^2 = eta^2 times the eta = 1 posterior variance (a noise std linear in eta, not in eta^2, would fail)."""
    sde = VPSDE()
    score_fn = toy_mixture("ring2d").score_fn(sde)
    n, s = 20000, 0.25
    x_t = torch.tensor([[0.7, -0.4]], dtype=torch.float64).expand(n, 2).contiguous()
    x_s, _ = SAMPLERS["ddim"](sde, score_fn, x_t.shape, nfe=1, eps=s, x_T=x_t, generator=torch.Generator().manual_seed(2),
                              eta=eta)
    tt, ss = torch.tensor(sde.T, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    a_t, sig_t, a_s, sig_s = sde.mean_coeff(tt), sde.marginal_std(tt), sde.mean_coeff(ss), sde.marginal_std(ss)
    eps_hat = -sig_t * score_fn(x_t[:1], tt.expand(1))
    x0_hat = (x_t[:1] - sig_t * eps_hat) / a_t
    posterior_var = sig_s ** 2 * (1 - (a_t / a_s) ** 2 * sig_s ** 2 / sig_t ** 2)  # eta = 1 (DDIM eq. 16)
    c2 = eta ** 2 * posterior_var
    mean = a_s * x0_hat + (sig_s ** 2 - c2).sqrt() * eps_hat
    assert torch.allclose(x_s.mean(0), mean[0], atol=4 * c2.sqrt().item() / math.sqrt(n))
    assert torch.allclose(x_s.var(0), c2.expand(2), rtol=0.06)


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
    assert 7 < err[50] / err[500] < 14  # first order: ~10x for 10x the steps (measured 9.4; second order: 100x)


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
    """Error against the closed-form PF-ODE map drops ~2^order when the steps double: the measured order
    p = log2(coarse / fine) lies within 0.25 below and 0.3 above `order` (so a second-order method fails the
    first-order band). Third-order methods converge faster than 3 on this Gaussian (measured p = 2.8-4.0: the
    leading error terms partly cancel for a Gaussian target), so their band is [2.75, 4.1]."""
    x_T = sde.prior_sampling((64, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = gaussian_flow(sde, GAUSSIAN, x_T)
    score_fn = GAUSSIAN.score_fn(sde)
    coarse = (run(name, sde, score_fn, x_T, nfe, **options)[0] - exact).abs().max().item()
    fine = (run(name, sde, score_fn, x_T, 2 * nfe, **options)[0] - exact).abs().max().item()
    measured = math.log2(coarse / fine)  # measured: ddim 0.98, heun 1.88-2.08, dpm2(m)/dpmpp2m 1.95-2.08
    assert order - 0.25 < measured < (order + 0.3 if order < 3 else 4.1), (coarse, fine, measured)


@pytest.mark.parametrize("name,nfe,min_ratio", [("dpm2", (80, 160), 2.5), ("dpm3", (59, 119), 5.0),
                                                 ("dpmpp3m", (80, 160), 5.0)])
def test_dpm_solver_order_on_ring_mixture(ring_reference, name, nfe, min_ratio):
    """Same check on the 8-mode ring against the rk4 reference, at budgets that double the number of steps
    (dpm3: 59 = 19 x 3 + 2 and 119 = 39 x 3 + 2 are 20 and 40 steps ending in one order-2 step).
    Pre-asymptotic ratios: measured 3.2 / 6.3 / 7.7."""
    sde, score_fn, x_T, ref = ring_reference
    coarse = (run(name, sde, score_fn, x_T, nfe[0])[0] - ref).abs().max().item()
    fine = (run(name, sde, score_fn, x_T, nfe[1])[0] - ref).abs().max().item()
    assert fine < 3e-3 and coarse / fine > min_ratio, (coarse, fine)


# --- DPM-Solver update formulas, written out from the papers ------------------------------------------------


class _Paper:
    """VP quantities for the hand-written DPM-Solver steps (Lu et al. 2022, app. / eq. 3.4), float64 scalars."""

    def __init__(self, sde):
        self.sde, self.b0, self.db = sde, sde.beta_min, sde.beta_max - sde.beta_min
        self.score = GAUSSIAN.score_fn(sde)

    def alpha(self, t):
        return math.exp(-0.5 * (self.b0 * t + 0.5 * self.db * t * t))

    def sigma(self, t):
        return math.sqrt(1.0 - self.alpha(t) ** 2)

    def lam(self, t):
        return math.log(self.alpha(t) / self.sigma(t))

    def time(self, lam):  # B(t) = log(1 + e^{-2 lambda}) solved for t
        big_b = math.log1p(math.exp(-2.0 * lam))
        return (-self.b0 + math.sqrt(self.b0 ** 2 + 2.0 * self.db * big_b)) / self.db

    def grid(self, n):  # n steps uniform in lambda from T to eps
        l0, l1 = self.lam(1.0), self.lam(EPS)
        return [1.0] + [self.time(l0 + (l1 - l0) * i / n) for i in range(1, n)] + [EPS]

    def eps(self, x, t):  # noise prediction
        return -self.sigma(t) * self.score(x, torch.full((x.shape[0],), t, dtype=torch.float64))

    def x0(self, x, t):  # data prediction
        return (x - self.sigma(t) * self.eps(x, t)) / self.alpha(t)


def _paper_dpm_solver_step(p, x, s, t, order):
    """DPM-Solver-1 (eq. 3.7), -2 (alg. 1, r1 = 1/2), -3 (alg. 2, r1 = 1/3, r2 = 2/3) from s to t."""
    h = p.lam(t) - p.lam(s)
    e_s = p.eps(x, s)
    if order == 1:
        return p.alpha(t) / p.alpha(s) * x - p.sigma(t) * math.expm1(h) * e_s
    if order == 2:
        s1 = p.time(p.lam(s) + 0.5 * h)
        u1 = p.alpha(s1) / p.alpha(s) * x - p.sigma(s1) * math.expm1(0.5 * h) * e_s
        return (p.alpha(t) / p.alpha(s) * x - p.sigma(t) * math.expm1(h) * e_s
                - p.sigma(t) / (2 * 0.5) * math.expm1(h) * (p.eps(u1, s1) - e_s))
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = p.time(p.lam(s) + r1 * h), p.time(p.lam(s) + r2 * h)
    u1 = p.alpha(s1) / p.alpha(s) * x - p.sigma(s1) * math.expm1(r1 * h) * e_s
    d1 = p.eps(u1, s1) - e_s
    u2 = (p.alpha(s2) / p.alpha(s) * x - p.sigma(s2) * math.expm1(r2 * h) * e_s
          - p.sigma(s2) * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1) * d1)
    d2 = p.eps(u2, s2) - e_s
    return (p.alpha(t) / p.alpha(s) * x - p.sigma(t) * math.expm1(h) * e_s
            - p.sigma(t) / r2 * (math.expm1(h) / h - 1) * d2)


@pytest.mark.parametrize("name,nfe,orders", [("dpm2", 4, [2, 2]), ("dpm2", 5, [2, 2, 1]), ("dpm3", 6, [3, 2, 1]),
                                             ("dpm3", 8, [3, 3, 2])])
def test_dpm_solver_singlestep_is_the_papers_algorithm(name, nfe, orders):
    sde = VPSDE()
    p = _Paper(sde)
    x_T = sde.prior_sampling((16, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grid = p.grid(len(orders))
    x = x_T
    for s, t, k in zip(grid[:-1], grid[1:], orders):
        x = _paper_dpm_solver_step(p, x, s, t, k)
    got, used = run(name, sde, p.score, x_T, nfe)
    assert used == nfe and torch.allclose(got, x, rtol=1e-9, atol=1e-10), (got - x).abs().max()


def test_dpm_solver_singlestep_other_schedules_use_the_budget_grid():
    """With a time-uniform schedule the step ends are the K-step grid at the cumulative orders (official code):
    K = 6, orders [3, 2, 1] -> grid points 0, 3, 5, 6 of t_j = T + j (eps - T) / 6."""
    sde = VPSDE()
    p = _Paper(sde)
    x_T = sde.prior_sampling((16, 2), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    fine = [1.0 + j * (EPS - 1.0) / 6 for j in range(7)]
    x = x_T
    for (a, b), k in zip([(0, 3), (3, 5), (5, 6)], [3, 2, 1]):
        x = _paper_dpm_solver_step(p, x, fine[a], fine[b], k)
    got, _ = run("dpm3", sde, p.score, x_T, 6, schedule="uniform")
    assert torch.allclose(got, x, rtol=1e-9, atol=1e-10), (got - x).abs().max()


@pytest.mark.parametrize("name,steps,orders", [("dpmpp2m", 3, [1, 2, 1]), ("dpmpp2m", 16, [1] + [2] * 15),
                                               ("dpm2m", 4, [1, 2, 2, 1]), ("dpmpp3m", 5, [1, 2, 3, 2, 1]),
                                               ("dpm3m", 3, [1, 2, 1])])
def test_dpm_solver_multistep_is_the_papers_update(name, steps, orders):
    """Multistep with one evaluation per step. Order 2: DPM-Solver++(2M), Lu et al. 2022b alg. 2,
    x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) ((1 + 1/(2r)) m_s - 1/(2r) m_prev), and its
    noise-prediction analogue for DPM-Solver; order 3: the third-order Taylor form of the exact solution (++ eq. 8 /
    DPM-Solver eq. 3.4) with the derivatives of the quadratic through the last three predictions."""
    data = name.startswith("dpmpp")
    sde = VPSDE()
    p = _Paper(sde)
    x_T = sde.prior_sampling((16, 2), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grid = p.grid(steps)
    x, hist = x_T, []  # hist: (lambda, prediction), newest first
    for i, k in enumerate(orders):
        s, t = grid[i], grid[i + 1]
        ls, h = p.lam(s), p.lam(t) - p.lam(s)
        m = p.x0(x, s) if data else p.eps(x, s)
        hist = [(ls, m)] + hist[:2]
        if data:  # x_t = (sigma_t/sigma_s) x + alpha_t int e^{lam - lam_t}... : weights on m, m', m''
            decay, w = p.sigma(t) / p.sigma(s), [-p.alpha(t) * math.expm1(-h),
                                                 p.alpha(t) * (math.expm1(-h) + h),
                                                 p.alpha(t) * (1 - h + h * h / 2 - math.exp(-h))]
        else:
            decay, w = p.alpha(t) / p.alpha(s), [-p.sigma(t) * math.expm1(h),
                                                 -p.sigma(t) * (math.expm1(h) - h),
                                                 -p.sigma(t) * (math.expm1(h) - h - h * h / 2)]
        if k == 1:
            x = decay * x + w[0] * m
        elif k == 2:
            (l0, m0), (l1, m1) = hist[0], hist[1]
            r = (l0 - l1) / h
            x = decay * x + w[0] * ((1 + 1 / (2 * r)) * m0 - 1 / (2 * r) * m1)
        else:
            (l0, m0), (l1, m1), (l2, m2) = hist
            f01, f12 = (m0 - m1) / (l0 - l1), (m1 - m2) / (l1 - l2)
            f012 = (f01 - f12) / (l0 - l2)
            x = decay * x + w[0] * m0 + w[1] * (f01 + f012 * (l0 - l1)) + w[2] * 2 * f012
    got, used = run(name, sde, p.score, x_T, steps)
    assert used == steps and torch.allclose(got, x, rtol=1e-9, atol=1e-10), (got - x).abs().max()


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
    ("ring2d", 2000, EDMSDE(), "heun", {}, 10, 61),
    # measured at 121 / 61 nfe: 0.096 / 0.064 (EDM, VE ring, seeds 0/1), 0.100 (mix64 VP); floors 0.105 / 0.144
    ("ring2d", 2000, EDMSDE(), "edm_stochastic", {"S_churn": 10, "S_tmin": 0.05, "S_tmax": 50, "S_noise": 1.003},
     10, 121),
    ("mix64", 400, VPSDE(), "edm_stochastic", {"S_churn": 40}, 10, 61),
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
                         ids=[f"{c[0]}-{type(c[2]).__name__}-{c[3]}{'-opts' if c[4] else ''}" for c in QUALITY_CASES])
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


def test_adaptive_bias_falls_with_rtol_on_ve_ring():
    """VE ring, 2000 samples against the exact mixture: the error falls as rtol falls, and at a tight rtol the mean
    radius and the mean log-density are within 3 standard errors of exact (se 0.0045 / 0.022 at n = 2000).

    Measured (4 seeds): log-density gap 0.27 at rtol 0.3, -0.004 at 0.05; radius error -0.013 / -0.002. Before the
    Brownian path was kept through rejections the radius was 0.03-0.04 too large at rtol 0.05 and 0.01.
    """
    sde, mixture = VESDE(), toy_mixture("ring2d")
    n = 2000
    exact = mixture.sample(200000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    radius, logp = exact.norm(dim=1), mixture.log_prob(exact)
    se_radius, se_logp = radius.std().item() / math.sqrt(n), logp.std().item() / math.sqrt(n)
    x_T = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gaps, radius_err = {}, {}
    for rtol in (0.3, 0.05):
        x, _ = run("adaptive", sde, mixture.score_fn(sde), x_T, None, seed=1, rtol=rtol)
        gaps[rtol] = logp.mean().item() - mixture.log_prob(x).mean().item()
        radius_err[rtol] = x.norm(dim=1).mean().item() - radius.mean().item()
    assert gaps[0.3] > 5 * se_logp, gaps  # loose: a clear discretization error
    assert abs(gaps[0.05]) < 3 * se_logp and abs(radius_err[0.05]) < 3 * se_radius, (gaps, radius_err)
    assert gaps[0.3] - gaps[0.05] > 3 * math.sqrt(2) * se_logp, gaps


def test_brownian_memory_keeps_the_path_through_rejections():
    """Rejections that depend on the drawn increment leave the accepted path exactly Brownian."""
    n = 20000
    memory = BrownianMemory(n, 1, torch.zeros(n, 1, dtype=torch.float64), torch.Generator().manual_seed(0))
    ones = torch.ones(n, dtype=torch.bool)
    # Try s = 0 -> 0.5; reject where the increment is large (the conditioning that biased the old sampler).
    first = memory.increment(torch.full((n,), 0.5, dtype=torch.float64), ones)
    reject = first[:, 0].abs() > math.sqrt(0.5)
    memory.advance(~reject)
    def steps(if_rejected, otherwise):
        return torch.where(reject, torch.tensor(if_rejected, dtype=torch.float64), torch.tensor(otherwise,
                                                                                                 dtype=torch.float64))

    second = memory.increment(steps(0.2, 0.5), ones)  # retry a shorter step where rejected
    memory.advance(ones)
    # Rows that were rejected now come back to s = 0.5: the rejected value must be returned exactly.
    third = memory.increment(steps(0.3, 0.5), ones)
    memory.advance(ones)
    assert torch.allclose((second + third)[reject], first[reject], atol=1e-12)
    last = memory.increment(steps(1.5, 0.5), ones)
    memory.advance(ones)
    w1 = memory.w_cur[:, 0]  # W(s) at s = 2 (both row kinds), built from accepted increments only
    assert torch.allclose(memory.s_cur, torch.full_like(memory.s_cur, 2.0))
    se_var = 2.0 * math.sqrt(2.0 / n)
    assert abs(w1.var().item() - 2.0) < 4 * se_var and abs(w1.mean().item()) < 4 * math.sqrt(2.0 / n)
    # Rejected rows: after the retried path reached the rejected point, the path goes on independently of it.
    later = (w1 - first[:, 0])[reject]
    m = reject.sum().item()
    assert abs(later.var().item() - 1.5) < 4 * 1.5 * math.sqrt(2.0 / m)
    assert abs(torch.corrcoef(torch.stack([later, first[reject, 0]]))[0, 1].item()) < 4 / math.sqrt(m)
    assert memory.stored().item() == 0 and torch.isfinite(last).all()


# --- NFE accounting, reproducibility, dtype ----------------------------------------------------


def test_singlestep_orders_are_the_papers():
    """DPM-Solver sec. 3.4 (DPM-Solver-fast) for a budget K, written out case by case."""
    assert singlestep_orders(6, 3) == [3, 2, 1]  # K % 3 == 0: [3] * (K // 3 - 1) + [2, 1]
    assert singlestep_orders(3, 3) == [2, 1]
    assert singlestep_orders(7, 3) == [3, 3, 1]  # K % 3 == 1: [3] * (K // 3) + [1]
    assert singlestep_orders(8, 3) == [3, 3, 2]  # K % 3 == 2: [3] * (K // 3) + [2]
    assert singlestep_orders(1, 3) == [1] and singlestep_orders(2, 3) == [2]
    assert singlestep_orders(6, 2) == [2, 2, 2] and singlestep_orders(5, 2) == [2, 2, 1]
    for k in range(1, 40):
        for order in (2, 3):
            assert sum(singlestep_orders(k, order)) == k


def test_multistep_orders_lower_order_final():
    """Official DPM-Solver code: warm-up 1, 2, ..; below 10 steps (15 for DPM-Solver++) the last steps drop to
    order min(order, steps - i)."""
    assert multistep_orders(6, 3, data=False) == [1, 2, 3, 3, 2, 1]
    assert multistep_orders(10, 3, data=False) == [1, 2] + [3] * 8
    assert multistep_orders(12, 3, data=True) == [1, 2] + [3] * 8 + [2, 1]
    assert multistep_orders(15, 3, data=True) == [1, 2] + [3] * 13
    assert multistep_orders(4, 2, data=True) == [1, 2, 2, 1]
    assert multistep_orders(2, 3, data=False) == [1, 1]


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
    """A cap too small for the tolerance: steps that could not reach eps within the trials left are lengthened
    to (t - eps) / trials and accepted, so the tail is a fixed-step improved-Euler run that spends the cap
    exactly. With the exact score of N(0, I) (stationary under VP) 25 such trials keep the variance near 1; a
    cap far above what the tolerance needs changes nothing."""
    sde = VPSDE()
    score_fn = lambda x, t: -x  # noqa: E731
    x, used = solvers.sample(sde, score_fn, (4000, 2), solver="adaptive", nfe=cap, rtol=1e-4,
                             generator=torch.Generator().manual_seed(0))
    assert used == 2 * (cap // 2) and torch.isfinite(x).all()
    if cap == 50:
        assert abs(float(x.var()) - 1.0) < 0.1, float(x.var())
    free, free_used = solvers.sample(sde, score_fn, (2000, 2), solver="adaptive", rtol=1e-2,
                                     generator=torch.Generator().manual_seed(0))
    capped, capped_used = solvers.sample(sde, score_fn, (2000, 2), solver="adaptive", nfe=4 * free_used, rtol=1e-2,
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


# --- EDM's stochastic sampler (Karras et al. 2022, algorithm 2) -------------------------------


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), EDMSDE()], ids=["vp", "ve", "edm"])
@pytest.mark.parametrize("nfe", [7, 12])
def test_edm_stochastic_without_churn_is_heun(sde, nfe):
    """S_churn = 0 (or a churn window that no noise level enters) is the deterministic Heun sampler, bit for bit."""
    mixture = toy_mixture("ring2d")
    x_T = sde.prior_sampling((64, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    heun, used = run("heun", sde, mixture.score_fn(sde), x_T, nfe)
    for options in ({}, {"S_churn": 40, "S_tmin": 1e6}):
        got, got_used = run("edm_stochastic", sde, mixture.score_fn(sde), x_T, nfe, **options)
        assert torch.equal(got, heun) and got_used == used == nfe


def test_edm_stochastic_churn_noise_and_evaluations():
    """With churn: exactly `nfe` score calls, each at a noise level on the grid or its raised sigma_hat =
    sigma_i (1 + gamma), gamma = min(S_churn / steps, sqrt 2 - 1), capped at sigma_max; reproducible per generator."""
    sde, mixture = EDMSDE(), toy_mixture("ring2d")
    x_T = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = []

    def score_fn(x, t):
        seen.append(float(t[0]))
        return mixture.marginal_score(x, t, sde)

    nfe, churn = 12, 3.0
    a, used = run("edm_stochastic", sde, score_fn, x_T, nfe, S_churn=churn)
    b, _ = run("edm_stochastic", sde, mixture.score_fn(sde), x_T, nfe, S_churn=churn)
    c, _ = run("edm_stochastic", sde, mixture.score_fn(sde), x_T, nfe, seed=1, S_churn=churn)
    assert used == len(seen) == nfe and torch.equal(a, b) and not torch.allclose(a, c)
    steps = nfe // 2
    grid = time_grid(sde, steps, EPS, "karras").tolist()
    gamma = min(churn / steps, math.sqrt(2) - 1)
    first_stages = seen[0::2]  # EDM: t = sigma, so t_hat = sigma_i (1 + gamma) <= T
    expected = [grid[0]] + [min(s * (1 + gamma), sde.T) for s in grid[1:-1]]
    assert first_stages == pytest.approx(expected, rel=1e-12)
    assert seen[1::2] == pytest.approx(grid[1:], rel=1e-12)
    # S_noise = 0: the steps still start from sigma_hat, with no noise added (no dependence on the generator)
    quiet = [run("edm_stochastic", sde, mixture.score_fn(sde), x_T, nfe, seed=s, S_churn=churn, S_noise=0.0)[0]
             for s in (0, 1)]
    assert torch.equal(quiet[0], quiet[1]) and not torch.equal(quiet[0], run("heun", sde, mixture.score_fn(sde), x_T,
                                                                           nfe)[0])


@pytest.mark.parametrize("options", [{"S_churn": -1}, {"S_noise": float("nan")}, {"S_tmin": 2, "S_tmax": 1}])
def test_edm_stochastic_bad_options(options):
    sde = EDMSDE()
    with pytest.raises(UserError, match="edm_stochastic: need S_churn"):
        run("edm_stochastic", sde, lambda x, t: -x, torch.zeros(2, 2), 4, **options)

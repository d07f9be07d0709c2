"""Samplers against exact scores: quality vs NFE to the noise floor, published update rules, PF-ODE inversion,
honest NFE accounting and clear errors. Fast by default; the full sweep is marked slow."""
import math

import pytest
import torch

import solvers
from data import toy_mixture
from data.mixtures import GaussianMixture
from errors import UserError
from evaluation.metrics import mean_log_density_gap, mode_weight_tv, sliced_wasserstein
from sde_lib import VESDE, VPSDE, subVPSDE
from solvers.common import CountingScore
from solvers.correctors import CORRECTORS
from solvers.predictors import AncestralPredictor, ReverseDiffusionPredictor

EPS = 1e-3


def sde_for(solver: str):
    """The SDE each sampler is tested under: VE for ald (NCSN), VP otherwise."""
    return VESDE(0.01, 20.0) if solver == "ald" else VPSDE()


def draw(solver, sde, score_fn, n, dim, nfe, seed=1, **options):
    return solvers.sample(sde, score_fn, (n, dim), solver=solver, nfe=nfe, eps=EPS,
                          generator=torch.Generator().manual_seed(seed), **options)


# --- quality against the noise floor --------------------------------------------------------------------
# solver -> ((nfe, options) at a small budget, (nfe, options) at a large one); adaptive solvers tighten
# their tolerance instead. Unknown (newly registered) solvers get DEFAULT_PLAN.
DEFAULT_PLAN = ((10, {}), (200, {}))
PLAN = {
    "ald": ((100, {}), (1000, {})),
    "ancestral": ((30, {}), (200, {})),
    "reverse_diffusion": ((30, {}), (200, {})),
    "pc": ((50, {}), (400, {})),
    "sde_srk": ((50, {}), (1000, {})),  # 10 NFE per step: 1000 buys 100 steps
    "ode": ((None, {"rtol": 0.3, "atol": 0.3}), (None, {"rtol": 1e-5, "atol": 1e-5})),
    "ode_scipy": ((None, {"rtol": 0.3, "atol": 0.3}), (None, {"rtol": 1e-5, "atol": 1e-5})),
    "adaptive": ((None, {"rtol": 0.5}), (None, {"rtol": 0.01})),
    "ode_rk4": ((8, {}), (200, {})),
}
# |mean log-density gap| at the large budget must be below this (n = 1000 exact samples have SE ~ 0.03 on
# ring2d; measured values at the large budgets are <= 0.06); SW-2 within SW_FACTOR x its noise floor.
GAP_TOL = 0.12
SW_FACTOR = 1.6


@pytest.fixture(scope="module")
def ring():
    mixture = toy_mixture("ring2d")
    g = torch.Generator().manual_seed(123)
    reference = mixture.sample(1000, generator=g)
    second = mixture.sample(1000, generator=g)
    big = mixture.sample(20000, generator=g, dtype=torch.float64)
    return mixture, reference, second, big


def quality(x, mixture, reference, big):
    sw = sliced_wasserstein(x, reference, n_projections=128, generator=torch.Generator().manual_seed(0))
    return sw, abs(mean_log_density_gap(x, mixture, big)), mode_weight_tv(x, mixture)


@pytest.mark.parametrize("solver", solvers.available_solvers())
def test_error_falls_with_nfe_to_noise_floor_ring2d(solver, ring):
    mixture, reference, second, big = ring
    floor_sw, _, floor_tv = quality(second, mixture, reference, big)
    sde = sde_for(solver)
    (nfe_lo, opt_lo), (nfe_hi, opt_hi) = PLAN.get(solver, DEFAULT_PLAN)
    x_lo, used_lo = draw(solver, sde, mixture.score_fn(sde), 1000, 2, nfe_lo, **opt_lo)
    x_hi, used_hi = draw(solver, sde, mixture.score_fn(sde), 1000, 2, nfe_hi, **opt_hi)
    sw_lo, gap_lo, _ = quality(x_lo, mixture, reference, big)
    sw_hi, gap_hi, tv_hi = quality(x_hi, mixture, reference, big)
    assert used_hi > used_lo
    assert gap_hi < gap_lo, f"{solver}: |log-density gap| {gap_lo:.3g} at NFE {used_lo} -> {gap_hi:.3g} at {used_hi}"
    assert gap_hi < GAP_TOL
    assert sw_hi < SW_FACTOR * floor_sw, f"{solver}: SW-2 {sw_hi:.3g} vs noise floor {floor_sw:.3g}"
    assert tv_hi < floor_tv + 0.04


SWEEP = (10, 20, 50, 100, 250, 1000)
# |gap| allowed at the largest budget, set from measurement (n = 2000: standard error ~0.016 on ring2d, ~0.14 on
# mix64). ALD keeps a bias in 64-D at 1000 NFE (gap ~3 at corrector_steps=2; 0.93 at 4000 NFE): it gets 4000 and 1.5.
SWEEP_GAP_TOL = {"ring2d": 0.12, "mix64": 0.5}
SWEEP_EXTRA = {("ald", "mix64"): ((4000,), 1.5)}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ring2d", "mix64"])
@pytest.mark.parametrize("solver", solvers.available_solvers())
def test_full_sweep_error_falls_to_noise_floor(solver, target):
    """The comparison sweep: the error at the largest budget is within noise of the smallest and near the floor."""
    if solver in ("ode", "ode_scipy", "adaptive"):
        pytest.skip("adaptive: covered by the tolerance test")
    mixture = toy_mixture(target)
    sde = sde_for(solver) if target == "ring2d" else (VESDE(0.01, 50.0) if solver == "ald" else VPSDE())
    g = torch.Generator().manual_seed(7)
    n = 2000
    reference, second = mixture.sample(n, generator=g), mixture.sample(n, generator=g)
    big = mixture.sample(50000, generator=g, dtype=torch.float64)
    se = float(mixture.log_prob(big).std()) / math.sqrt(n)  # standard error of a gap from n samples
    floor_sw = sliced_wasserstein(second, reference, generator=torch.Generator().manual_seed(0))
    extra, gap_tol = SWEEP_EXTRA.get((solver, target), ((), SWEEP_GAP_TOL[target]))
    # PC's Langevin step is set by snr, not by the step count, so its bias stays as NFE grows: a small snr here.
    options = {"snr": 0.05} if solver == "pc" else {}
    gaps = []
    for nfe in SWEEP + extra:
        try:
            x, _ = draw(solver, sde, mixture.score_fn(sde), n, mixture.dim, nfe, **options)
        except UserError:  # budget too small for this solver
            continue
        gaps.append(abs(mean_log_density_gap(x, mixture, big)) if torch.isfinite(x).all() else math.inf)
    sw = sliced_wasserstein(x, reference, generator=torch.Generator().manual_seed(0))
    assert gaps[-1] < gaps[0] and gaps[-1] <= min(gaps) + 2 * se + 0.02, gaps
    assert gaps[-1] < gap_tol
    assert sw < SW_FACTOR * floor_sw


def test_ald_on_discrete_ve():
    """ALD (NCSN) with a VE SDE of 10 discrete noise levels' geometric range recovers the ring's modes."""
    mixture = toy_mixture("ring2d")
    sde = VESDE(0.01, 20.0, N=10)
    x, used = draw("ald", sde, mixture.score_fn(sde), 2000, 2, 600, corrector_steps=3)
    assert used == 199 * 3 + 1  # 199 levels x 3 steps + final denoising
    radius = x.norm(dim=1)
    assert abs(radius.mean().item() - 2.0) < 0.05
    assert mode_weight_tv(x, mixture) < 0.06


# --- published update rules -----------------------------------------------------------------------------
def test_ddpm_ancestral_step_is_the_published_update():
    """One ancestral step equals Ho et al.'s x_{i-1} = (x - beta/sqrt(1-abar) eps)/sqrt(1-beta) + sqrt(beta) z."""
    sde = VPSDE(0.1, 20.0, 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPM's schedule
    assert torch.allclose(sde.discrete_betas(torch.arange(1000, dtype=torch.float64)), betas, atol=1e-12)
    alpha_bar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    eps_pred = torch.randn(16, 3, generator=g, dtype=torch.float64)
    z = torch.randn(16, 3, generator=g, dtype=torch.float64)
    for i in (999, 500, 3, 0):
        score = lambda y, t, i=i: -eps_pred / math.sqrt(1 - alpha_bar[i])  # noqa: E731
        step = AncestralPredictor(sde, score, 1000)
        out, mean = step.update(x, torch.tensor(i / 999.0), None, i, lambda: z)
        b = betas[i]
        expected_mean = (x - b / math.sqrt(1 - alpha_bar[i]) * eps_pred) / math.sqrt(1 - b)
        assert torch.allclose(mean, expected_mean, atol=1e-12)
        assert torch.allclose(out, expected_mean + math.sqrt(b) * z, atol=1e-12)


def test_smld_ancestral_and_reverse_diffusion_steps():
    """SMLD ancestral (Song et al. eq. 47) and reverse diffusion of the VP chain (eq. 46) on fixed noise."""
    g = torch.Generator().manual_seed(1)
    x, s, z = (torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(3))
    ve = VESDE(0.01, 50.0, 100)
    sig = 0.01 * (5000.0 ** (torch.arange(100, dtype=torch.float64) / 99))
    out, mean = AncestralPredictor(ve, lambda y, t: s, 100).update(x, torch.tensor(0.5), None, 42, lambda: z)
    jump = sig[42] ** 2 - sig[41] ** 2
    assert torch.allclose(mean, x + jump * s, atol=1e-9)
    assert torch.allclose(out, x + jump * s + torch.sqrt(sig[41] ** 2 * jump / sig[42] ** 2) * z, atol=1e-9)
    vp = VPSDE(0.1, 20.0, 100)
    b = 0.1 / 100 + 42 * 19.9 / (100 * 99)
    out, _ = ReverseDiffusionPredictor(vp, lambda y, t: s, 100).update(x, torch.tensor(0.5), None, 42, lambda: z)
    expected = x - (math.sqrt(1 - b) - 1) * x + b * s + math.sqrt(b) * z
    assert torch.allclose(out, expected, atol=1e-12)


def test_chain_index_survives_float32_rounding():
    """A 10^4-step DDPM chain in float32 steps with beta_i of exactly index i (i T/(n-1) would round to i-1)."""
    n, i = 10000, 2525
    vp = VPSDE(0.1, 20.0, n)
    x = torch.randn(4, 2)
    s = 1e4 * torch.randn(4, 2)  # large, so that beta_{i-1} (2e-7 smaller) would show
    out, _ = ReverseDiffusionPredictor(vp, lambda y, t: s, n).update(x, torch.tensor(0.25), None, i,
                                                                     lambda: torch.zeros_like(x))
    b = vp.discrete_betas(torch.tensor(float(i), dtype=torch.float64)).float()
    assert torch.allclose(out, x - (torch.sqrt(1 - b) - 1) * x + b * s, atol=2e-4)


def test_langevin_corrector_step_size_follows_snr():
    """Alg. 4 (VE): step = 2 (snr ||z|| / ||s||)^2 with batch-mean norms, x <- x + step s + sqrt(2 step) z."""
    g = torch.Generator().manual_seed(2)
    x, s, z = (torch.randn(32, 4, generator=g, dtype=torch.float64) for _ in range(3))
    corrector = CORRECTORS["langevin"](VESDE(), lambda y, t: s, corrector_steps=1, snr=0.16)
    out, mean = corrector.update(x, torch.tensor(0.3), lambda: z)
    step = 2 * (0.16 * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2
    assert torch.allclose(mean, x + step * s) and torch.allclose(out, mean + torch.sqrt(2 * step) * z)


# --- probability-flow ODE -------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE(), VESDE(0.01, 20.0)], ids=["vp", "subvp", "ve"])
def test_pf_ode_encode_decode_roundtrip(sde):
    mixture = toy_mixture("ring2d")
    x = mixture.sample(200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    score = mixture.score_fn(sde)
    z, nfe_enc = solvers.encode(sde, score, x, eps=EPS, rtol=1e-7, atol=1e-7)
    x_back, nfe_dec = solvers.decode(sde, score, z, eps=EPS, rtol=1e-7, atol=1e-7)
    assert nfe_enc > 0 and nfe_dec > 0
    assert (x_back - x).abs().max() < 1e-3
    # latents look like the prior: VP/sub-VP unit variance, VE sigma_max
    assert abs(z.std().item() - float(sde.marginal_std(torch.tensor(1.0)))) < 0.15 * float(
        sde.marginal_std(torch.tensor(1.0)))


def test_decoded_prior_samples_have_the_mixture_weights():
    mixture = GaussianMixture([0.6, 0.3, 0.1], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [0.3, 0.3, 0.3])
    sde = VPSDE()
    z = sde.prior_sampling((4000, 2), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x, _ = solvers.decode(sde, mixture.score_fn(sde), z, eps=EPS, rtol=1e-5, atol=1e-5)
    assert mode_weight_tv(x, mixture) < 0.025  # binomial SE of the weights ~ 0.008


@pytest.mark.parametrize("method,steps_nfe", [("euler", (25, 25)), ("midpoint", (25, 24)), ("rk4", (25, 24))])
def test_fixed_step_ode_budget(method, steps_nfe):
    mixture, sde = toy_mixture("ring2d"), VPSDE()
    _, used = draw(f"ode_{method}", sde, mixture.score_fn(sde), 8, 2, steps_nfe[0])
    assert used == steps_nfe[1]


def test_ode_scipy_agrees_with_torchdiffeq():
    mixture, sde = toy_mixture("ring2d"), VPSDE()
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a, _ = solvers.sample(sde, mixture.score_fn(sde), z.shape, solver="ode", x_T=z, rtol=1e-7, atol=1e-7)
    b, _ = solvers.sample(sde, mixture.score_fn(sde), z.shape, solver="ode_scipy", x_T=z, rtol=1e-7, atol=1e-7)
    assert (a - b).abs().max() < 1e-4


# --- NFE accounting, reproducibility, dtype ---------------------------------------------------------------
@pytest.mark.parametrize("solver", solvers.available_solvers())
def test_nfe_is_counted_honestly(solver):
    mixture = toy_mixture("ring2d")
    sde = sde_for(solver)
    counter = CountingScore(mixture.score_fn(sde))
    adaptive = solver in ("ode", "ode_scipy", "adaptive")  # they take tolerances (nfe is at most a cap)
    budget = None if adaptive else 60
    x, used = draw(solver, sde, counter, 16, 2, budget)
    assert used == counter.calls > 0
    assert x.shape == (16, 2) and torch.isfinite(x).all()
    if not adaptive:
        assert used <= budget


@pytest.mark.parametrize("solver,nfe,expected", [
    ("em", 50, 50), ("reverse_diffusion", 50, 50), ("pc", 50, 50), ("pc", 51, 50), ("sde_torchsde", 50, 50),
    ("sde_srk", 50, 41)])
def test_budget_maps_to_steps(solver, nfe, expected):
    mixture, sde = toy_mixture("ring2d"), VPSDE()
    counter = CountingScore(mixture.score_fn(sde))
    _, used = draw(solver, sde, counter, 4, 2, nfe)
    assert used == counter.calls == expected


def test_pc_budget_with_corrector_steps_and_denoising():
    mixture, sde = toy_mixture("ring2d"), VESDE(0.01, 20.0)
    counter = CountingScore(mixture.score_fn(sde))
    _, used = draw("pc", sde, counter, 4, 2, 100, predictor="reverse_diffusion", corrector="ald", corrector_steps=2,
                   denoise=True)
    assert used == counter.calls == 33 * 3 + 1


@pytest.mark.parametrize("solver", ["em", "pc", "ancestral", "ald", "sde_torchsde"])
def test_generator_makes_samples_reproducible(solver):
    mixture = toy_mixture("ring2d")
    sde = sde_for(solver)
    a, _ = draw(solver, sde, mixture.score_fn(sde), 8, 2, 60, seed=9)
    b, _ = draw(solver, sde, mixture.score_fn(sde), 8, 2, 60, seed=9)
    c, _ = draw(solver, sde, mixture.score_fn(sde), 8, 2, 60, seed=10)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("solver", ["em", "pc", "ode", "sde_torchsde"])
def test_x_T_and_dtype_are_respected(solver):
    mixture, sde = toy_mixture("ring2d"), VPSDE()
    x_T = torch.randn(8, 2, dtype=torch.float64)
    x, _ = solvers.sample(sde, mixture.score_fn(sde), (8, 2), solver=solver, nfe=None if solver == "ode" else 60, x_T=x_T,
                          generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float64
    assert torch.equal(x_T, x_T.clone())  # not modified in place


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["em", "pc", "ode_rk4", "sde_torchsde"])
def test_runs_on_cuda(solver):
    mixture, sde = toy_mixture("ring2d"), VPSDE()
    mixture_score = mixture.score_fn(sde)
    x, _ = solvers.sample(sde, mixture_score, (64, 2), solver=solver, nfe=20,
                          generator=torch.Generator(device="cuda").manual_seed(0))
    assert x.device.type == "cuda" and torch.isfinite(x).all()


# --- clear errors ---------------------------------------------------------------------------------------
def _ring_vp():
    mixture, sde = toy_mixture("ring2d"), VPSDE()
    return sde, mixture.score_fn(sde)


@pytest.mark.parametrize("call,match", [
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="nope"), "unknown solver"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="em", nfe=0), "nfe must be positive"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="pc", nfe=-5), "nfe must be positive"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="ald", nfe=10), "not valid for VPSDE"),
    (lambda s, f: solvers.sample(subVPSDE(), f, (4, 2), solver="ancestral", nfe=100), "not valid for subVPSDE"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="pc", predictor="rk9"), "unknown predictor"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="pc", corrector="hmc"), "unknown corrector"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="pc", predictor="none", corrector="none"), "does nothing"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="ode", method="rk45"), "unknown ODE method"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="ode_scipy", method="BDF"), "unknown scipy ODE method"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="sde_torchsde", method="log_ode"), "unknown torchsde"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="sde_srk", nfe=5), "too small"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="ancestral", nfe=10), "beta = 2 >= 1"),
    (lambda s, f: solvers.sample(s, f, (4, 2), solver="em", x_T=torch.zeros(3, 2)), "x_T has shape"),
])
def test_clear_user_errors(call, match):
    sde, score = _ring_vp()
    with pytest.raises(UserError, match=match):
        call(sde, score)


def test_unknown_solver_option_is_a_clear_error():
    from data import toy_mixture
    from errors import UserError
    from sde_lib import VPSDE
    from solvers import sample

    sde = VPSDE()
    with pytest.raises(UserError, match=r"solver 'ddim' has no option 'snr'; its options: eta, schedule"):
        sample(sde, toy_mixture("ring2d").score_fn(sde), (4, 2), solver="ddim", nfe=5, snr=0.1)


@pytest.mark.parametrize("solver", ["ode", "ode_scipy"])
def test_nfe_caps_the_adaptive_ode_solvers(solver):
    """`nfe` is a budget for every solver: an adaptive ODE that needs more refuses in one line naming the keys."""
    mixture, sde = toy_mixture("ring2d"), VPSDE()
    score = mixture.score_fn(sde)
    _, needed = solvers.sample(sde, score, (64, 2), solver=solver, generator=torch.Generator().manual_seed(0))
    _, used = solvers.sample(sde, score, (64, 2), solver=solver, nfe=needed,
                             generator=torch.Generator().manual_seed(0))
    assert used == needed
    with pytest.raises(UserError, match=r"more than nfe=\d+ .*sampling\.rtol") as error:
        solvers.sample(sde, score, (64, 2), solver=solver, nfe=needed - 1, generator=torch.Generator().manual_seed(0))
    assert len(str(error.value).splitlines()) == 1

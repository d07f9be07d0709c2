"""SDE library: kernels against the moment ODEs, Euler-Maruyama simulation, DDPM/SMLD chains, reversal."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.stats import norm

from sde_lib import EDMSDE, VESDE, VPSDE, get_sde, subVPSDE

SDES = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE(), "edm": EDMSDE()}


def linear_coefficients(sde, t: float):
    """a(t) with f(x, t) = a(t) x, and g(t)^2, read off the SDE itself."""
    one = torch.ones(1, 1, dtype=torch.float64)
    drift, diffusion = sde.sde(one, torch.tensor([t], dtype=torch.float64))
    return drift.item(), diffusion.item() ** 2


@pytest.mark.parametrize("name", SDES)
def test_marginal_prob_matches_moment_odes(name):
    """dm/dt = a m and dv/dt = 2 a v + g^2, integrated by scipy from the kernel at t=0, give marginal_prob."""
    sde = SDES[name]
    x0 = torch.tensor([[1.7]], dtype=torch.float64)
    _, std0 = sde.marginal_prob(x0, 0.0)

    def rhs(t, y):
        a, g2 = linear_coefficients(sde, t)
        return [a * y[0], 2 * a * y[1] + g2]

    times = [sde.T * u for u in (0.01, 0.1, 0.37, 0.8, 1.0)]  # EDM: T = sigma_max
    sol = solve_ivp(rhs, (0.0, sde.T), [1.7, std0.item() ** 2], t_eval=times, rtol=1e-12, atol=1e-14,
                    method="DOP853")
    for k, t in enumerate(times):
        mean, std = sde.marginal_prob(x0, t)
        assert mean.item() == pytest.approx(sol.y[0, k], rel=1e-6)
        assert std.item() == pytest.approx(math.sqrt(sol.y[1, k]), rel=1e-6)


@pytest.mark.parametrize("name", SDES)
def test_euler_maruyama_simulation_matches_kernel(name):
    """A fine forward Euler-Maruyama simulation has the kernel's mean and variance (within MC error)."""
    sde = SDES[name]
    gen = torch.Generator().manual_seed(1)
    n, steps, t_end = 20000, 1000, 0.6 * sde.T
    x0 = torch.full((n, 1), 1.5, dtype=torch.float64)
    _, std0 = sde.marginal_prob(x0, 0.0)
    x = x0 + std0[:, None] * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    dt = t_end / steps
    for i in range(steps):
        drift, diffusion = sde.sde(x, i * dt)
        x = x + drift * dt + diffusion[:, None] * math.sqrt(dt) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0, t_end)
    sem = std[0].item() / math.sqrt(n)
    assert abs(x.mean().item() - mean[0, 0].item()) < 5 * sem + 1e-3 * abs(mean[0, 0].item())
    var_err = std[0].item() ** 2 * math.sqrt(2.0 / n)
    assert abs(x.var().item() - std[0].item() ** 2) < 5 * var_err + 5e-3 * std[0].item() ** 2


def test_vp_discretize_is_ddpm_chain():
    sde = VPSDE(0.1, 20.0, N=1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    i = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(sde.discrete_betas(i), betas, rtol=0, atol=1e-15)
    x = torch.randn(1000, 3, dtype=torch.float64)
    t = i / 999
    f, G = sde.discretize(x, t)
    # x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z
    assert torch.allclose(x + f, torch.sqrt(1 - betas)[:, None] * x, rtol=0, atol=1e-14)
    assert torch.allclose(G, torch.sqrt(betas), rtol=0, atol=1e-15)


def test_ve_discretize_is_smld_chain():
    sde = VESDE(0.01, 50.0, N=1000)
    sigmas = torch.exp(torch.linspace(math.log(0.01), math.log(50.0), 1000, dtype=torch.float64))
    i = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(sde.discrete_sigmas(i), sigmas, rtol=1e-12)
    x = torch.randn(1000, 2, dtype=torch.float64)
    f, G = sde.discretize(x, i / 999)
    previous = torch.cat([torch.zeros(1, dtype=torch.float64), sigmas[:-1]])
    assert torch.equal(f, torch.zeros_like(x))
    # x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z
    assert torch.allclose(G, torch.sqrt(sigmas ** 2 - previous ** 2), rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discrete_index_on_sampling_grids(dtype):
    """Both t = i/(N-1) and the sampler grid linspace(T, eps, N) map to the indices N-1 .. 0."""
    sde = VPSDE(N=1000)
    x = torch.zeros(1000, 1, dtype=dtype)
    expected = torch.arange(999, -1, -1)
    assert torch.equal(sde.discrete_index(torch.arange(999, -1, -1, dtype=dtype) / 999, x), expected)
    assert torch.equal(sde.discrete_index(torch.linspace(1.0, 1e-3, 1000, dtype=dtype), x), expected)


def test_subvp_discretize_is_euler_maruyama():
    sde = subVPSDE(N=100)
    x = torch.randn(4, 2, dtype=torch.float64)
    f, G = sde.discretize(x, 0.3)
    drift, diffusion = sde.sde(x, 0.3)
    dt = sde.T / sde.N  # Euler-Maruyama step of the N-step chain
    assert torch.allclose(f, drift * dt) and torch.allclose(G, diffusion * math.sqrt(dt))


@pytest.mark.parametrize("name", SDES)
def test_prior_logp_and_sampling(name):
    sde = SDES[name]
    scale = sde.sigma_max if name in ("ve", "edm") else 1.0
    z = sde.prior_sampling((6, 3, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    again = sde.prior_sampling((6, 3, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(z, again) and z.dtype == torch.float64
    expected = norm.logpdf(z.numpy(), scale=scale).reshape(6, -1).sum(1)
    np.testing.assert_allclose(sde.prior_logp(z).numpy(), expected, rtol=1e-12)
    big = sde.prior_sampling((200000,), generator=torch.Generator().manual_seed(4))
    assert big.std().item() == pytest.approx(scale, rel=0.01)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_shape_and_dtype(name, dtype):
    sde = SDES[name]
    x = torch.randn(5, 3, 8, 8, dtype=dtype)
    t = torch.rand(5, dtype=dtype)
    drift, diffusion = sde.sde(x, t)
    mean, std = sde.marginal_prob(x, t)
    f, G = sde.discretize(x, t)
    assert drift.shape == mean.shape == f.shape == x.shape
    assert diffusion.shape == std.shape == G.shape == (5,)
    assert all(v.dtype == dtype for v in (drift, diffusion, mean, std, f, G))
    assert sde.prior_logp(x).shape == (5,)


@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_sde_coefficients(probability_flow):
    """Reverse drift f - g^2 s (eq. 6) or f - g^2 s / 2 (eq. 13); diffusion g or 0."""
    sde = VPSDE()
    score_fn = lambda x, t: -x * (1 + t[:, None])  # noqa: E731
    rsde = sde.reverse(score_fn, probability_flow=probability_flow)
    x = torch.randn(7, 2, dtype=torch.float64)
    t = torch.rand(7, dtype=torch.float64)
    f, g = sde.sde(x, t)
    drift, diffusion = rsde.sde(x, t)
    w = 0.5 if probability_flow else 1.0
    assert torch.allclose(drift, f - w * g[:, None] ** 2 * score_fn(x, t))
    assert torch.allclose(diffusion, torch.zeros_like(g) if probability_flow else g)
    fd, gd = sde.discretize(x, t)
    rf, rg = rsde.discretize(x, t)
    assert torch.allclose(rf, fd - w * gd[:, None] ** 2 * score_fn(x, t))


def test_get_sde_from_config():
    import configs

    for name, cls in [("vp_toy", VPSDE), ("subvp_toy", subVPSDE), ("ve_toy", VESDE)]:
        assert type(get_sde(configs.get_config(name))) is cls
    config = configs.get_config("ve_toy")
    config.sde.name, config.sde.sigma_max = "edm", 60.0
    edm = get_sde(config)
    assert type(edm) is EDMSDE and edm.T == 60.0 and edm.prior_logp(torch.zeros(1, 2)).item() == pytest.approx(
        -math.log(2 * math.pi * 3600.0))
    config = configs.get_config("vp_toy")
    config.sde.name = "nope"
    with pytest.raises(ValueError, match="unknown SDE 'nope'"):
        get_sde(config)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSDE(1.0, 0.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(0.0, 1.0)
    with pytest.raises(ValueError, match="sigma_max > 0"):
        EDMSDE(0.0)
    with pytest.raises(ValueError, match="N must be"):
        VPSDE(N=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [10, 100, 1000, 2000])
def test_step_time_truncates_back_to_its_step(n, dtype):
    """t_i (N - 1) truncates to i (the reference's `labels.long()`) and t_i is within 2 ulp of i / (N - 1);
    the plain product i / (N - 1) misses for some i (e.g. 170 of 1000 in float32)."""
    sde = VPSDE(N=n)
    i = torch.arange(n)
    t = sde.step_time(i, dtype)
    assert t.dtype == dtype
    assert torch.equal((t * (n - 1)).long(), i)
    exact = i.double() / (n - 1)
    ulp = torch.finfo(dtype).eps * exact.clamp_min(torch.finfo(dtype).tiny)
    assert ((t.double() - exact).abs() <= 2 * ulp + torch.finfo(dtype).tiny).all()


def test_sde_parameters_must_be_finite_numbers_and_n_an_integer():
    """Text, inf and N = 2.5 used to be accepted (2.5 truncated to 2, text failing later deep inside)."""
    import pytest

    from sde_lib import EDMSDE, VESDE, VPSDE

    for make in (lambda: VPSDE("0.1", 20.0), lambda: VPSDE(0.1, float("inf")), lambda: VPSDE(N=2.5),
                 lambda: VPSDE(N=True), lambda: VESDE(0.01, float("nan")), lambda: EDMSDE(float("inf"))):
        with pytest.raises(ValueError, match="finite number|integer >= 1"):
            make()


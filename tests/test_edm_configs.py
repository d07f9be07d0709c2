"""The EDM configs: edm_toy trains on the ring with its own SDE, preconditioning, weighting and samplers."""
import pytest
import torch

import configs
import solvers
from data import toy_mixture
from evaluation.metrics import sliced_wasserstein
from models import get_score_fn, score_fn_options
from sde_lib import EDMSDE, get_sde
from training.checkpoint import restore_model
from training.trainer import train


def test_edm_toy_config():
    config = configs.get_config("edm_toy")
    sde = get_sde(config)
    assert type(sde) is EDMSDE and sde.T == config.sde.sigma_max == 20.0
    assert (config.model.parameterization, config.training.weighting, config.training.proposal) == (
        "edm", "edm", "lognormal")


def _sw2(samples, reference):
    return float(sliced_wasserstein(samples, reference, n_projections=256, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("seed", [0])
def test_edm_toy_learns_the_ring(tmp_path, seed):
    """200 steps of edm_toy (64-wide MLP), sampled with the config's Heun (35 NFE) and with edm_stochastic.

    Measured (seed 0): SW-2 heun 0.119, edm_stochastic (S_churn 10, 61 NFE) 0.121; with Euler-Maruyama (200 NFE)
    seeds 0 / 1 give 0.122 / 0.176. Scale as in test_training: two sets of exact draws 0.08-0.12, the best single
    Gaussian 0.41; 0.25 separates them. About 2 s on a CPU.
    """
    config = configs.get_config("edm_toy")
    config.model.hidden_dim, config.seed, config.device = 64, seed, "cpu"
    config.training.update(batch_size=256, n_iters=200, lr=3e-3, snapshot_every=200, plot_samples=0, progress=False)
    train(config, str(tmp_path))
    model, _ = restore_model(config, str(tmp_path), "cpu")
    sde = get_sde(config)
    score_fn = get_score_fn(sde, model, **score_fn_options(config))
    reference = toy_mixture("ring2d").sample(2000, generator=torch.Generator().manual_seed(2))
    runs = {"heun": {"nfe": config.sampling.nfe},
            "edm_stochastic": {"nfe": 61, "S_churn": 10.0, "S_tmin": 0.05, "S_tmax": 10.0, "S_noise": 1.003}}
    for solver, options in runs.items():
        samples, used = solvers.sample(sde, score_fn, (2000, 2), solver=solver, eps=config.sampling.eps,
                                       generator=torch.Generator().manual_seed(1), **options)
        assert used == options["nfe"]
        error = _sw2(samples, reference)
        print(solver, error)
        assert error < 0.25, (solver, error)


def test_sampling_config_reaches_edm_stochastic():
    """config.sampling.s_churn / s_tmin / s_tmax / s_noise are the sampler's S_* options (None: its defaults)."""
    from configs import apply_overrides
    from evaluation.sample_runner import sampler_options

    config = configs.get_config("edm_toy")
    assert sampler_options(config, "edm_stochastic") == {}
    apply_overrides(config, ["sampling.s_churn=40", "sampling.s_tmin=0.05", "sampling.s_tmax=50.0",
                             "sampling.s_noise=1.003"])
    assert sampler_options(config, "edm_stochastic") == {"S_churn": 40, "S_tmin": 0.05, "S_tmax": 50.0,
                                                         "S_noise": 1.003}
    assert "S_churn" not in sampler_options(config, "heun")


def test_edm_image_configs():
    """edm_digits / edm_cifar carry the EDM recipe; edm_cifar is EDM's CIFAR-10 DDPM++ setup (Table 7, config F)."""
    from models import create_model

    for name in ("edm_digits", "edm_cifar"):
        config = configs.get_config(name)
        sde = get_sde(config)
        assert type(sde) is EDMSDE and sde.T == 80.0 and config.model.parameterization == "edm"
        assert (config.training.weighting, config.training.proposal, config.sampling.solver) == ("edm", "lognormal",
                                                                                                  "heun")
    config = configs.get_config("edm_cifar")
    assert (config.model.name, config.model.ch_mult, config.model.num_res_blocks, config.model.dropout) == (
        "ddpmpp", (2, 2, 2), 4, 0.13)
    assert (config.training.lr, config.training.batch_size, config.data.random_flip) == (1e-3, 512, False)
    assert config.model.ema_rate ** (500_000 / 512) == pytest.approx(0.5)  # EMA half-life 0.5 Mimg
    assert sum(p.numel() for p in create_model(config).parameters()) == pytest.approx(55.7e6, rel=0.01)


def test_edm_digits_trains_and_samples(tmp_path):
    """A few steps of edm_digits (image path: edm preconditioning on DDPM++) and a Heun sample of the right shape."""
    config = configs.get_config("edm_digits")
    config.device, config.model.nf = "cpu", 16
    config.training.update(batch_size=8, n_iters=2, snapshot_every=2, plot_samples=0, progress=False, warmup=1)
    train(config, str(tmp_path))
    model, _ = restore_model(config, str(tmp_path), "cpu")
    sde = get_sde(config)
    samples, used = solvers.sample(sde, get_score_fn(sde, model, **score_fn_options(config)), (2, 1, 8, 8),
                                   solver="edm_stochastic", nfe=4, eps=config.sampling.eps, S_churn=5.0,
                                   generator=torch.Generator().manual_seed(0))
    assert used == 4 and samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()


def test_edm_sde_refuses_discrete_time():
    from errors import UserError

    with pytest.raises(UserError, match="no discrete chain"):
        get_score_fn(EDMSDE(), torch.nn.Identity(), continuous=False)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_edm_recipe_learns_mix64(tmp_path, seed):
    """edm_toy's recipe on the 64-d mixture (sigma_max 80, 128-wide MLP, 800 steps), Heun 35 NFE, 400 samples.

    Measured SW-2 (seeds 0 / 1): 0.174 / 0.207 against a noise floor of 0.170 (the largest of 3 distances between
    exact sample sets of the same size); 300 steps gave 0.293 / 0.186. About 5-9 s each on a CPU.
    """
    mixture = toy_mixture("mix64")
    reference = mixture.sample(400, generator=torch.Generator().manual_seed(2))
    draws = torch.Generator().manual_seed(11)

    def sw2(x):
        return float(sliced_wasserstein(x.float(), reference, n_projections=64,
                                        generator=torch.Generator().manual_seed(0)))

    floor = max(sw2(mixture.sample(400, generator=draws)) for _ in range(3))
    config = configs.get_config("edm_toy")
    config.data.dataset, config.data.dim, config.sde.sigma_max = "mix64", 64, 80.0
    config.model.hidden_dim, config.seed, config.device = 128, seed, "cpu"
    config.training.update(batch_size=256, n_iters=800, lr=3e-3, snapshot_every=800, plot_samples=0, progress=False)
    train(config, str(tmp_path))
    model, _ = restore_model(config, str(tmp_path), "cpu")
    sde = get_sde(config)
    samples, _ = solvers.sample(sde, get_score_fn(sde, model, **score_fn_options(config)), (400, 64), solver="heun",
                                nfe=35, eps=config.sampling.eps, generator=torch.Generator().manual_seed(1))
    assert sw2(samples) < 1.35 * floor, (sw2(samples), floor)

"""Score networks: score_fn conventions against hand computations, EMA algebra, network shapes and sizes."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from configs import get_config
from data.mixtures import toy_mixture
from errors import UserError
from models import create_model, get_score_fn
from models.ema import ExponentialMovingAverage
from sde_lib import VESDE, VPSDE, subVPSDE


class Recorder(nn.Module):
    """A fake network: output = 2 x + 1 (any shape), remembering the labels it was given."""

    def forward(self, x, labels):
        self.labels = labels
        return 2.0 * x + 1.0


def _vp_std(beta_min, beta_max, t):
    b = beta_min * t + 0.5 * t ** 2 * (beta_max - beta_min)
    return math.sqrt(1.0 - math.exp(-b)), 1.0 - math.exp(-b)


@pytest.mark.parametrize("shape", [(3, 2), (3, 3, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vp_continuous_score(shape, dtype):
    sde, net = VPSDE(0.1, 20.0, 1000), Recorder()
    x = torch.randn(shape, dtype=dtype)
    t = torch.tensor([0.01, 0.5, 1.0], dtype=dtype)
    score = get_score_fn(sde, net, continuous=True)(x, t)
    assert score.dtype == dtype and score.shape == x.shape
    np.testing.assert_allclose(net.labels.numpy(), 999.0 * t.numpy(), rtol=1e-6)
    for b, tb in enumerate(t.tolist()):
        std = _vp_std(0.1, 20.0, tb)[0]
        np.testing.assert_allclose(score[b].numpy(), -(2 * x[b].numpy() + 1) / std, rtol=1e-5)


def test_vp_discrete_score_uses_ddpm_chain():
    n = 1000
    sde, net = VPSDE(0.1, 20.0, n), Recorder()
    x = torch.randn(4, 2, dtype=torch.float64)
    idx = [0, 1, 500, 999]
    t = torch.tensor(idx, dtype=torch.float64) / (n - 1)
    score = get_score_fn(sde, net, continuous=False)(x, t)
    assert net.labels.tolist() == idx
    betas = np.linspace(0.1 / n, 20.0 / n, n)  # DDPM's 1e-4 .. 0.02
    alpha_bar = np.cumprod(1 - betas)
    for b, i in enumerate(idx):
        np.testing.assert_allclose(score[b].numpy(), -(2 * x[b].numpy() + 1) / math.sqrt(1 - alpha_bar[i]), rtol=1e-9)


@pytest.mark.parametrize("continuous", [True, False])
def test_subvp_score_is_always_continuous(continuous):
    sde, net = subVPSDE(0.1, 20.0, 1000), Recorder()
    x = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    score = get_score_fn(sde, net, continuous=continuous)(x, t)
    np.testing.assert_allclose(net.labels.numpy(), 999.0 * t.numpy())
    for b, tb in enumerate(t.tolist()):
        np.testing.assert_allclose(score[b].numpy(), -(2 * x[b].numpy() + 1) / _vp_std(0.1, 20.0, tb)[1], rtol=1e-9)


@pytest.mark.parametrize("shape", [(2, 2), (2, 3, 4, 4)])
def test_ve_score_labels(shape):
    sde, net = VESDE(0.01, 50.0, 1000), Recorder()
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.tensor([0.25, 1.0], dtype=torch.float64)
    score = get_score_fn(sde, net, continuous=True)(x, t)
    np.testing.assert_allclose(net.labels.numpy(), 0.01 * (50.0 / 0.01) ** t.numpy(), rtol=1e-12)
    np.testing.assert_allclose(score.numpy(), 2 * x.numpy() + 1)  # VE: output is the score
    ti = torch.tensor([3, 998], dtype=torch.float64) / 999
    get_score_fn(sde, net, continuous=False)(x, ti)
    np.testing.assert_allclose(net.labels.numpy(), 0.01 * (50.0 / 0.01) ** (np.array([3, 998]) / 999), rtol=1e-12)


def test_scalar_time_and_low_precision_input():
    sde, net = VPSDE(), Recorder()
    x = torch.randn(3, 2).to(torch.bfloat16)
    score = get_score_fn(sde, net)(x, 0.5)
    assert score.dtype == torch.bfloat16
    assert net.labels.dtype == torch.float32 and torch.allclose(net.labels, torch.full((3,), 499.5))
    with pytest.raises(UserError):
        get_score_fn(sde, net)(x, torch.ones(5))


class ExactNoisePredictor(nn.Module):
    """eps(x, 999 t) = -std(t) * exact score: get_score_fn must give back the exact score."""

    def __init__(self, mixture, sde):
        super().__init__()
        self.mixture, self.sde = mixture, sde

    def forward(self, x, labels):
        t = labels / 999.0
        return -self.sde.marginal_std(t)[:, None] * self.mixture.marginal_score(x, t, self.sde)


@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE()])
def test_exact_noise_predictor_gives_exact_score(sde):
    mixture = toy_mixture("ring2d")
    x = torch.randn(16, 2, dtype=torch.float64) * 2
    t = torch.rand(16, dtype=torch.float64) * 0.99 + 0.01
    score = get_score_fn(sde, ExactNoisePredictor(mixture, sde))(x, t)
    torch.testing.assert_close(score, mixture.marginal_score(x, t, sde), rtol=1e-10, atol=1e-10)


# --- MLP ------------------------------------------------------------------------------
def _toy_config(name="vp_toy"):
    config = get_config(name)
    config.model.hidden_dim, config.model.num_layers, config.model.embedding_dim = 32, 2, 16
    return config


@pytest.mark.parametrize("name", ["vp_toy", "subvp_toy", "ve_toy"])
def test_mlp_shapes_and_gradients(name):
    config = _toy_config(name)
    model = create_model(config)
    sde_cls = {"vp_toy": VPSDE, "subvp_toy": subVPSDE, "ve_toy": VESDE}[name]
    sde = sde_cls() if sde_cls is not VESDE else VESDE(0.01, 20.0)
    x = torch.randn(5, 2)
    score = get_score_fn(sde, model)(x, torch.rand(5) * 0.9 + 0.1)
    assert score.shape == (5, 2) and torch.isfinite(score).all()
    score.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_mlp_scale_by_sigma_and_embedding():
    config = _toy_config("ve_toy")
    scaled = create_model(config)
    config.model.scale_by_sigma = False
    plain = create_model(config)
    plain.load_state_dict(scaled.state_dict())
    assert scaled.embedding_type == "fourier"
    x, sigma = torch.randn(4, 2), torch.tensor([0.01, 0.1, 1.0, 20.0])
    torch.testing.assert_close(scaled(x, sigma), plain(x, sigma) / sigma[:, None])
    # the embedding sees the label: different noise levels give different outputs
    assert not torch.allclose(plain(x, sigma), plain(x, sigma.flip(0)))
    with pytest.raises(UserError, match="expects inputs"):
        plain(torch.randn(4, 3), sigma)


def test_create_model_errors():
    config = _toy_config()
    config.model.name = "resnet"
    with pytest.raises(UserError, match="ddpmpp"):
        create_model(config)
    config = _toy_config("vp_toy")
    config.model.scale_by_sigma = True
    with pytest.raises(UserError, match="scale_by_sigma"):
        create_model(config)
    config = _toy_config("vp_toy")
    config.model.embedding_type = "learned"
    with pytest.raises(UserError, match="embedding_type"):
        create_model(config)


# --- EMA ------------------------------------------------------------------------------
def test_ema_matches_recursion():
    model = nn.Linear(3, 2)
    ema = ExponentialMovingAverage(model, decay=0.9, use_num_updates=False)
    expected = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    for s, e in zip(ema.shadow_params, expected):
        torch.testing.assert_close(s, e)


def test_ema_warmup_decay_and_constant_target():
    model = nn.Linear(2, 2)
    ema = ExponentialMovingAverage(model, decay=0.999)
    assert ema.current_decay() == pytest.approx(2 / 11)  # min(0.999, (1 + n)/(10 + n)) at n = 1
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    keep = 1.0
    for n in range(1, 21):
        keep *= min(0.999, (1 + n) / (10 + n))
        ema.update(model)
    assert ema.num_updates == 20
    for s, s0 in zip(ema.shadow_params, start):  # s_n = prod(d) s_0 + (1 - prod(d)) * 3
        torch.testing.assert_close(s, keep * s0 + (1 - keep) * 3.0)


def test_ema_store_copy_restore_and_state_dict():
    config = _toy_config("ve_toy")
    model = create_model(config)  # has a fixed Fourier W, which the EMA must skip
    ema = ExponentialMovingAverage(model, decay=0.5, use_num_updates=False)
    assert len(ema.shadow_params) == sum(1 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ema.update(model)
    current = {k: v.clone() for k, v in model.state_dict().items()}
    ema.store(model)
    ema.copy_to(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p, s in zip(trainable, ema.shadow_params):
        assert torch.equal(p, s)
    ema.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, current[k])
    other = ExponentialMovingAverage(create_model(config), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.num_updates is None
    for a, b in zip(other.shadow_params, ema.shadow_params):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        other.load_state_dict({"decay": 0.5, "num_updates": 0, "shadow_params": ema.shadow_params[:-1]})

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
    np.testing.assert_allclose(net.labels.numpy(), idx, rtol=0, atol=1e-9)
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


# --- U-Nets -----------------------------------------------------------------------------

import scipy.signal  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configs.default import get_default_config  # noqa: E402
from models import fir  # noqa: E402
from models.embeddings import positional_timesteps  # noqa: E402
from models.layers import NIN, AttnBlock  # noqa: E402
from models.ncsnv2 import InstanceNormPlus  # noqa: E402

# Reference settings of the CIFAR-10 configs (docs/MODELS.md); parameter counts computed once with
# these modules. The published reference layouts give the same numbers (see docs/MODELS.md).
CIFAR = {
    "ddpmpp_vp": (dict(name="ddpmpp", embedding_type="positional", num_res_blocks=4), "vpsde", True),
    "ddpmpp_deep": (dict(name="ddpmpp", embedding_type="positional", num_res_blocks=8), "subvpsde", True),
    "ncsnpp_ve": (dict(name="ncsnpp", embedding_type="fourier", fir=True, progressive_input="residual",
                       scale_by_sigma=True, num_res_blocks=4), "vesde", False),
    "ncsnpp_deep_ve": (dict(name="ncsnpp", embedding_type="fourier", fir=True, progressive_input="residual",
                            scale_by_sigma=True, num_res_blocks=8), "vesde", False),
    "ddpm": (dict(name="ddpm", num_res_blocks=2), "vpsde", True),
    "ncsnv2": (dict(name="ncsnv2", nonlinearity="elu", scale_by_sigma=True), "vesde", False),
}
PARAM_COUNTS = {"ddpmpp_vp": 61_804_419, "ddpmpp_deep": 106_632_579, "ncsnpp_ve": 62_758_915,
                "ncsnpp_deep_ve": 107_587_075, "ddpm": 35_218_947, "ncsnv2": 29_694_083}


def image_config(model: dict, sde: str, centered: bool, **tiny):
    config = get_default_config()
    config.data.kind, config.data.image_size, config.data.num_channels = "image", 32, 3
    config.data.centered = centered
    config.sde.name = sde
    config.model.dropout = 0.1
    for key, value in {**model, **tiny}.items():
        config.model[key] = value
    return config


@pytest.mark.parametrize("name", list(CIFAR))
def test_cifar_parameter_counts(name):
    with torch.device("meta"):  # counting needs no memory and no initialization
        model = create_model(image_config(*CIFAR[name]))
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", list(CIFAR))
def test_unet_output_shape(name):
    tiny = dict(nf=32, ch_mult=(1, 2), num_res_blocks=1) if name != "ncsnv2" else dict(nf=8)
    config = image_config(*CIFAR[name], **tiny)
    model = create_model(config).eval()
    x = torch.rand(2, 3, 32, 32)
    labels = torch.tensor([0.05, 20.0]) if config.sde.name == "vesde" else torch.tensor([3.0, 900.0])
    with torch.no_grad():
        out = model(x, labels)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


PROGRESSIVE_CASES = [(p, pi, "sum") for p in ("none", "output_skip", "residual")
                     for pi in ("none", "input_skip", "residual")] + [("output_skip", "input_skip", "cat"),
                                                                      ("residual", "residual", "cat")]


@pytest.mark.parametrize("progressive,progressive_input,combine", PROGRESSIVE_CASES)
def test_ncsnpp_progressive_options(progressive, progressive_input, combine):
    config = image_config(CIFAR["ncsnpp_ve"][0], "vesde", False, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                          progressive=progressive, progressive_input=progressive_input,
                          progressive_combine=combine, attn_resolutions=(8,), init_scale=1.0)
    config.data.image_size = 16
    model = create_model(config)
    out = model(torch.rand(2, 3, 16, 16), torch.tensor([0.1, 5.0]))
    assert out.shape == (2, 3, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_scale_by_sigma_divides_network_output():
    config = image_config(CIFAR["ncsnpp_ve"][0], "vesde", False, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                          init_scale=1.0)
    scaled = create_model(config).eval()
    config.model.scale_by_sigma = False
    plain = create_model(config).eval()
    plain.load_state_dict(scaled.state_dict())
    x, sigma = torch.rand(2, 3, 32, 32), torch.tensor([0.3, 7.0])
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, sigma), plain(x, sigma) / sigma[:, None, None, None])
        # through get_score_fn the VE network output is the score itself
        sde = VESDE(0.01, 50.0)
        t = torch.tensor([0.2, 0.6])
        torch.testing.assert_close(get_score_fn(sde, scaled)(x, t), scaled(x, sde.sigma(t)))


def test_channels_last_and_bf16_autocast():
    config = image_config(CIFAR["ddpmpp_vp"][0], "vpsde", True, nf=16, ch_mult=(1, 2), num_res_blocks=1,
                          init_scale=1.0)
    model = create_model(config).eval()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        ref = model(x, labels)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), labels)
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, labels)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).norm() / ref.norm() < 0.05


def test_attention_matches_direct_computation():
    block = AttnBlock(8, skip_rescale=True, init_scale=1.0)
    x = torch.randn(2, 8, 4, 4)
    h = block.GroupNorm_0(x)
    q, k, v = (torch.einsum("bchw,co->bohw", h, nin.W) + nin.b[:, None, None]
               for nin in (block.NIN_0, block.NIN_1, block.NIN_2))
    w = torch.einsum("bchw,bcij->bhwij", q, k).reshape(2, 4, 4, 16) / math.sqrt(8)
    w = torch.softmax(w, dim=-1).reshape(2, 4, 4, 4, 4)
    a = torch.einsum("bhwij,bcij->bchw", w, v)
    expected = (x + torch.einsum("bchw,co->bohw", a, block.NIN_3.W) + block.NIN_3.b[:, None, None]) / math.sqrt(2)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    nin = NIN(8, 5)
    torch.testing.assert_close(nin(x), torch.einsum("bchw,co->bohw", x, nin.W) + nin.b[:, None, None])


def test_fir_resampling_against_scipy():
    k1 = np.array([1.0, 3.0, 3.0, 1.0])
    kernel = fir.make_kernel(k1).double()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    img = x[0, 0].numpy()

    def separable(fn, a):
        rows = np.stack([fn(r) for r in a])
        return np.stack([fn(c) for c in rows.T]).T

    # upsampling: zero insertion and filtering with 2 k / sum(k); ours is the full result from index 1
    up = separable(lambda v: scipy.signal.upfirdn(2 * k1 / k1.sum(), v, up=2), img)
    np.testing.assert_allclose(fir.upsample_2d(x, kernel)[0, 0].numpy(), up[1:17, 1:17], atol=1e-12)
    # downsampling: filtering with k / sum(k), every second sample, ours from index 1
    down = separable(lambda v: scipy.signal.upfirdn(k1 / k1.sum(), v, down=2), img)
    np.testing.assert_allclose(fir.downsample_2d(x, kernel)[0, 0].numpy(), down[1:5, 1:5], atol=1e-12)
    # the box kernel [1, 1] gives nearest-neighbour upsampling and 2x2 average pooling
    box = fir.make_kernel([1.0, 1.0]).double()
    torch.testing.assert_close(fir.upsample_2d(x, box), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    torch.testing.assert_close(fir.downsample_2d(x, box), F.avg_pool2d(x, 2))


def test_fused_fir_convolutions_equal_resample_then_convolve():
    kernel = fir.make_kernel([1, 3, 3, 1]).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    # the fused ops pad once, so they agree with the two-step version away from the border
    fused = fir.upsample_conv_2d(x, w, kernel)
    assert fused.shape == (2, 5, 16, 16)
    torch.testing.assert_close(fused[..., 2:-2, 2:-2],
                               F.conv2d(fir.upsample_2d(x, kernel), w, padding=1)[..., 2:-2, 2:-2])
    fused = fir.conv_downsample_2d(x, w, kernel)
    assert fused.shape == (2, 5, 4, 4)
    torch.testing.assert_close(fused[..., 1:-1, 1:-1],
                               fir.downsample_2d(F.conv2d(x, w, padding=1), kernel)[..., 1:-1, 1:-1])


def test_positional_ve_labels_are_reference_indices():
    config = image_config({}, "vesde", False)
    sde = VESDE(config.sde.sigma_min, config.sde.sigma_max, config.sde.num_scales)
    i = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64)
    # the reference indexes its sigmas from sigma_max (i = 0) down to sigma_min (i = N - 1)
    steps = positional_timesteps(sde.discrete_sigmas(999.0 - i), config)
    torch.testing.assert_close(steps, i)
    config.sde.name = "vpsde"
    assert positional_timesteps(i, config) is i


def test_instance_norm_plus_formula():
    norm = InstanceNormPlus(3)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64) * 2 + torch.tensor([0.0, 1.0, 3.0]).double()[:, None, None]
    norm = norm.double()
    mu = x.mean(dim=(2, 3))
    sd = x.var(dim=(2, 3), unbiased=False).add(1e-5).sqrt()
    spread = (mu - mu.mean(1, keepdim=True)) / mu.var(1, keepdim=True).add(1e-5).sqrt()  # unbiased, as NCSN
    expected = (x - mu[..., None, None]) / sd[..., None, None] + spread[..., None, None] * norm.alpha[:, None, None]
    expected = norm.gamma[:, None, None] * expected + norm.beta[:, None, None]
    torch.testing.assert_close(norm(x), expected)


def test_ncsnv2_divides_by_sigma_and_rejects_large_images():
    config = image_config(CIFAR["ncsnv2"][0], "vesde", False, nf=8)
    model = create_model(config).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x, torch.tensor([1.0, 1.0])), model(x, torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(b, a / torch.tensor([2.0, 0.5])[:, None, None, None])
    config.data.image_size = 128
    with pytest.raises(UserError, match="96"):
        create_model(config)


def test_unet_config_errors():
    config = image_config(CIFAR["ddpmpp_vp"][0], "vpsde", True, progressive="sideways")
    with pytest.raises(UserError, match="progressive"):
        create_model(config)
    config = image_config(CIFAR["ddpmpp_vp"][0], "vpsde", True, ch_mult=(1, 2, 2, 2, 2, 2, 2))
    with pytest.raises(UserError, match="image_size"):
        create_model(config)
    config = image_config(CIFAR["ddpm"][0], "vpsde", True, nf=8)
    with pytest.raises(UserError, match="groups"):
        create_model(config)


def test_parameter_names_and_order_follow_the_reference_layout():
    # NCSN++ (VE): Fourier W, two embedding Dense layers, input conv, then a BigGAN block
    config = image_config(CIFAR["ncsnpp_ve"][0], "vesde", False, nf=16, ch_mult=(1, 2), num_res_blocks=1)
    names = [n for n, _ in create_model(config).named_parameters()]
    assert names[:12] == ["all_modules.0.W", "all_modules.1.weight", "all_modules.1.bias", "all_modules.2.weight",
                          "all_modules.2.bias", "all_modules.3.weight", "all_modules.3.bias",
                          "all_modules.4.GroupNorm_0.weight", "all_modules.4.GroupNorm_0.bias",
                          "all_modules.4.Conv_0.weight", "all_modules.4.Conv_0.bias", "all_modules.4.Dense_0.weight"]
    # input pyramid with "residual": a FIR downsampling conv right after the downsampling BigGAN block
    assert "all_modules.6.Conv2d_0.weight" in names and "all_modules.5.Conv_2.weight" in names
    # DDPM: its blocks register in forward order (reference layers.ResnetBlockDDPM), then the NIN shortcut
    config = image_config(CIFAR["ddpm"][0], "vpsde", True, nf=32, ch_mult=(1, 2), num_res_blocks=1)
    model = create_model(config)
    block = model.all_modules[5]  # level 1 (16 px): 32 -> 64 channels
    assert [n.rsplit(".", 1)[0] for n, _ in block.named_parameters()][::2] == [
        "GroupNorm_0", "Conv_0", "Dense_0", "GroupNorm_1", "Conv_1", "NIN_0"]
    assert isinstance(model.all_modules[6], AttnBlock)


def test_mlp_positional_embedding_of_ve_labels_is_the_step_index():
    """VE labels are sigmas (0.01..20 for ve_toy): the MLP embedded them raw, so the lowest fifth of the time range
    looked alike (embedding distance 0.05); NCSN++ embeds the reference's step index, and so does the MLP now."""
    import configs
    import models
    from models.embeddings import positional_timesteps, sinusoidal_embedding

    config = configs.get_config("ve_toy")
    config.model.embedding_type = "positional"
    model = models.create_model(config)
    sigmas = torch.tensor([0.01, 0.046])  # sigma(0) and sigma(0.2)
    steps = positional_timesteps(sigmas, config)
    assert steps[0] == pytest.approx(config.sde.num_scales - 1) and steps[1] < 0.85 * steps[0]
    seen = []
    model.embed.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(torch.zeros(2, 2), sigmas)
    torch.testing.assert_close(seen[0], sinusoidal_embedding(steps, model.embedding_dim))
    assert (seen[0][0] - seen[0][1]).norm() > 1.0

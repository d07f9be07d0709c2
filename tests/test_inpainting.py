"""Inpainting / colorization (Song et al., 2021, app. I) and PF-ODE interpolation against closed forms."""
import math

import pytest
import torch

from data.mixtures import toy_mixture
from errors import UserError
from sde_lib import VPSDE
from solvers.inpainting import check_mask, colorize, couple, decouple, gray_color_basis, inpaint
from solvers.interpolation import interpolate, slerp
from solvers.ode import decode, encode

SDE = VPSDE(0.1, 20.0, 1000)


def gaussian_score_fn(mu: torch.Tensor, cov: torch.Tensor, sde=SDE):
    """Exact score of N(mu, cov) pushed through the SDE: -(a^2 cov + s^2 I)^{-1} (x - a mu) (flattened x)."""
    eye = torch.eye(mu.numel(), dtype=torch.float64)

    def score_fn(x, t):
        shape = x.shape
        flat = x.reshape(shape[0], -1)
        a, s = sde.mean_coeff(t), sde.marginal_std(t)
        cov_t = a[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * eye
        return -torch.linalg.solve(cov_t, (flat - a[:, None] * mu)[..., None])[..., 0].reshape(shape)
    return score_fn


def conditional_gaussian(mu, cov, known: torch.Tensor, value: torch.Tensor):
    """Mean and covariance of the unknown coordinates given x[known] = value (Schur complement)."""
    k, u = known, ~known
    gain = cov[u][:, k] @ torch.linalg.inv(cov[k][:, k])
    return mu[u] + gain @ (value - mu[k]), cov[u][:, u] - gain @ cov[k][:, u]


def _random_cov(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return 0.3 * (a @ a.T) / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_inpainting_matches_the_gaussian_conditional():
    d, n = 3, 4000
    mu = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    cov = _random_cov(d, 0)
    known = torch.tensor([True, False, False])
    value = torch.tensor([1.0], dtype=torch.float64)
    x0 = torch.zeros(n, d, dtype=torch.float64)
    x0[:, 0] = value
    out, used = inpaint(SDE, gaussian_score_fn(mu, cov), x0, known.double(), nfe=400,
                        predictor="euler_maruyama", corrector="langevin", snr=0.3,
                        generator=torch.Generator().manual_seed(1))
    assert used == 400
    assert torch.equal(out[:, 0], x0[:, 0])  # the known part is the data
    mean, cond_cov = conditional_gaussian(mu, cov, known, value)
    got_mean, got_cov = out[:, 1:].mean(0), torch.cov(out[:, 1:].T)
    prior_mean = mu[1:]
    # The replacement method is approximate (independent noise in the known part): MC error ~0.01 plus a
    # small method bias; the unconditional answer (prior_mean, cov[1:, 1:]) is far outside these bounds.
    assert float((got_mean - mean).abs().max()) < 0.04, (got_mean, mean)
    assert float((prior_mean - mean).abs().max()) > 0.15
    rel = torch.linalg.matrix_norm(got_cov - cond_cov) / torch.linalg.matrix_norm(cond_cov)
    assert float(rel) < 0.15, (got_cov, cond_cov)


def test_mask_shape_and_values_are_checked():
    x0 = torch.zeros(4, 3, 8, 8)
    assert check_mask(torch.ones(3, 8, 8), x0).shape == x0.shape
    assert check_mask(torch.ones(1, 1, 8, 8), x0).shape == x0.shape
    with pytest.raises(UserError, match="mask has shape"):
        check_mask(torch.ones(3, 4, 4), x0)
    with pytest.raises(UserError, match="0 \\(missing\\) or 1"):
        check_mask(torch.full((3, 8, 8), 0.5), x0)
    with pytest.raises(UserError, match="mask has shape"):
        inpaint(SDE, lambda x, t: -x, x0, torch.ones(2, 8, 8), nfe=10)


def test_gray_color_decoupling_is_orthogonal():
    m = gray_color_basis(torch.float64)
    torch.testing.assert_close(m @ m.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(m[0], torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(couple(decouple(x)), x)
    torch.testing.assert_close(decouple(x)[:, 0], x.sum(1) / math.sqrt(3))
    with pytest.raises(UserError, match="RGB"):
        decouple(torch.zeros(2, 1, 4, 4))


def test_colorization_keeps_gray_and_samples_the_color_conditional():
    n = 3000
    mu = torch.tensor([0.6, 0.1, -0.4], dtype=torch.float64)  # one RGB pixel
    cov = _random_cov(3, 1)
    gray_value = 0.25
    gray = torch.full((n, 1, 1, 1), gray_value, dtype=torch.float64)
    out, _ = colorize(SDE, gaussian_score_fn(mu, cov), gray, nfe=400, predictor="euler_maruyama",
                      snr=0.3, generator=torch.Generator().manual_seed(2))
    assert out.shape == (n, 3, 1, 1)
    torch.testing.assert_close(out.mean(1), gray[:, 0], rtol=1e-12, atol=1e-12)
    # exact: the color coordinates y1, y2 = M[1:] x given y0 = sqrt(3) gray
    m = gray_color_basis(torch.float64)
    mu_y, cov_y = m @ mu, m @ cov @ m.T
    mean, cond_cov = conditional_gaussian(mu_y, cov_y, torch.tensor([True, False, False]),
                                          torch.tensor([math.sqrt(3) * gray_value], dtype=torch.float64))
    y = torch.einsum("ij,bj->bi", m, out[:, :, 0, 0])[:, 1:]
    assert float((y.mean(0) - mean).abs().max()) < 0.04, (y.mean(0), mean)
    rel = torch.linalg.matrix_norm(torch.cov(y.T) - cond_cov) / torch.linalg.matrix_norm(cond_cov)
    assert float(rel) < 0.15


def test_encode_decode_roundtrip_and_unique_latents():
    ring = toy_mixture("ring2d")
    score = ring.score_fn(SDE)
    x = ring.sample(32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z, _ = encode(SDE, score, x)
    z_again, _ = encode(SDE, score, x.clone())
    assert torch.equal(z, z_again)  # deterministic: same input, same latent
    x_back, _ = decode(SDE, score, z)
    assert float((x_back - x).abs().max()) < 1e-3
    assert abs(float(z.std()) - 1.0) < 0.3  # latents look like prior draws


def test_slerp_endpoints_and_norm():
    z0 = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    z1 = torch.tensor([[0.0, 3.0]], dtype=torch.float64)
    path = slerp(z0, z1, torch.linspace(0, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(path[0], z0)
    torch.testing.assert_close(path[-1], z1)
    torch.testing.assert_close(path.norm(dim=-1), torch.full((5, 1), 3.0, dtype=torch.float64))
    torch.testing.assert_close(path[2, 0], torch.tensor([3 / math.sqrt(2)] * 2, dtype=torch.float64))
    same = slerp(z0, z0, torch.tensor([0.5], dtype=torch.float64))  # zero angle: no division by zero
    torch.testing.assert_close(same[0], z0)


def test_interpolation_stays_on_the_data():
    ring = toy_mixture("ring2d")
    x_a = ring.means[0:1].clone()
    x_b = ring.means[2:3].clone()  # a quarter turn away
    frames, nfe = interpolate(SDE, ring.score_fn(SDE), x_a, x_b, num_frames=7)
    assert frames.shape == (7, 1, 2) and nfe > 0
    torch.testing.assert_close(frames[0], x_a, atol=1e-3, rtol=0)
    torch.testing.assert_close(frames[-1], x_b, atol=1e-3, rtol=0)
    radius = frames[:, 0].norm(dim=-1)
    # every frame is on the ring (radius 2, component std 0.2): inside the data range, never in the hole
    assert float((radius - 2.0).abs().max()) < 0.6, radius
    with pytest.raises(UserError, match="same shape"):
        interpolate(SDE, ring.score_fn(SDE), x_a, torch.zeros(2, 2, dtype=torch.float64))


# --- the CLI modes on a tiny untrained U-Net (files, shapes, known pixels, clear errors) -------------------------
import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

import configs  # noqa: E402
import main  # noqa: E402

TINY = ["--config.model.nf=8", "--config.model.ch_mult=(1, 2)", "--config.model.attn_resolutions=()",
        "--config.sampling.predictor=euler_maruyama", "--config.device=cpu"]


def _tiny_run(tmp_path, channels=1):
    from test_sample_cli import _write_untrained_checkpoint

    overrides = TINY + [f"--config.data.num_channels={channels}"]
    config = configs.get_config("vp_digits")
    configs.apply_overrides(config, [a[len("--config."):] for a in overrides])
    workdir = str(tmp_path / "run")
    _write_untrained_checkpoint(config, workdir)
    images = (np.random.default_rng(0).random((2, channels, 8, 8)) * 255).astype(np.uint8)
    path = str(tmp_path / "inputs.npz")
    np.savez(path, images=images)
    return workdir, overrides, path, images


def _cli(mode, workdir, overrides, *extra):
    return main.main(["--mode", mode, "--config", "vp_digits", "--workdir", workdir, "--nfe", "6", *overrides, *extra])


def test_inpaint_cli_keeps_known_pixels_and_writes_a_grid(tmp_path):
    workdir, overrides, path, images = _tiny_run(tmp_path)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = 255  # left half known
    import matplotlib.image
    matplotlib.image.imsave(str(tmp_path / "mask.png"), mask, cmap="gray")
    assert _cli("inpaint", workdir, overrides, "--input", path, "--mask", str(tmp_path / "mask.png")) == 0
    (npz,) = glob.glob(os.path.join(workdir, "controllable", "inpaint_seed42_h*.npz"))
    stem = npz[:-len(".npz")]
    results = np.load(stem + ".npz")["results"]
    assert results.shape == images.shape and results.dtype == np.uint8
    np.testing.assert_allclose(results[..., :4].astype(int), images[..., :4].astype(int), atol=1)
    assert json.load(open(stem + ".json"))["nfe_used"] == 6
    grid = matplotlib.image.imread(stem + ".png")
    # 2 rows of input | masked | result (8 px images, 2 px padding: 32 x 22) upscaled by a whole factor to at
    # least 256 px (and the title's width), the title and column labels above
    factor = grid.shape[1] // 32
    assert grid.shape[1] == 32 * factor and grid.shape[1] >= 256 and grid.shape[0] > 22 * factor
    assert _cli("inpaint", workdir, overrides, "--input", path, "--mask", "center") == 0


def test_cli_input_and_mask_errors(tmp_path, capsys):
    workdir, overrides, path, _ = _tiny_run(tmp_path)
    wrong = str(tmp_path / "wrong.npz")
    np.savez(wrong, mask=np.ones((4, 4)))
    cases = [(["--input", path, "--mask", wrong], "has shape"),
             (["--input", str(tmp_path / "nope.png"), "--mask", "left"], "does not exist"),
             (["--input", path], "needs --mask"),
             (["--input", path, "--mask", "diagonal"], "unknown mask"),
             (["--mask", "left"], "--input is missing")]
    for extra, message in cases:
        assert _cli("inpaint", workdir, overrides, *extra) == 2
        assert message in capsys.readouterr().err
    assert _cli("colorize", workdir, overrides, "--input", path) == 2
    assert "RGB model" in capsys.readouterr().err
    big = str(tmp_path / "big.npz")
    np.savez(big, images=np.zeros((1, 1, 16, 16), dtype=np.uint8))
    assert _cli("interpolate", workdir, overrides, "--input", path, "--input2", big) == 2
    assert "(1, 8, 8)" in capsys.readouterr().err


def test_colorize_and_interpolate_cli(tmp_path):
    workdir, overrides, path, images = _tiny_run(tmp_path, channels=3)
    assert _cli("colorize", workdir, overrides, "--input", path) == 0
    (npz,) = glob.glob(os.path.join(workdir, "controllable", "colorize_seed42_h*.npz"))
    results = np.load(npz)["results"]
    assert results.shape == images.shape and results.dtype == np.uint8  # (untrained net: colors are noise)
    second = str(tmp_path / "second.npz")
    np.savez(second, images=images[::-1].copy())
    # --nfe 6 per direction: too few for dopri5 at 1e-5 (one line naming the keys), what ode_euler spends exactly
    assert _cli("interpolate", workdir, overrides, "--input", path, "--input2", second, "--num_frames", "4") == 2
    assert _cli("interpolate", workdir, overrides, "--input", path, "--input2", second, "--num_frames", "4",
                "--solver", "ode_euler") == 0
    (npz,) = glob.glob(os.path.join(workdir, "controllable", "interpolate_h*.npz"))
    frames = np.load(npz)["results"]
    assert frames.shape == (4, 2, 3, 8, 8)
    facts = json.load(open(npz[:-len(".npz")] + ".json"))
    assert facts["nfe_used"] == 12 and facts["method"] == "euler" and facts["solver"] == "ode_euler"


def test_controllable_modes_honour_or_refuse_solver(tmp_path, capsys):
    workdir, overrides, path, _ = _tiny_run(tmp_path, channels=3)
    assert _cli("inpaint", workdir, overrides, "--input", path, "--mask", "left", "--solver", "em") == 0
    (path_json,) = glob.glob(os.path.join(workdir, "controllable", "inpaint_seed42_h*.json"))
    facts = json.load(open(path_json))
    assert (facts["predictor"], facts["corrector"], facts["nfe_used"]) == ("euler_maruyama", "none", 6)
    capsys.readouterr()
    for mode, solver, key in [("inpaint", "ddim", "sampling.predictor"), ("colorize", "heun", "sampling.corrector"),
                              ("interpolate", "em", "sampling.method")]:
        extra = ["--input2", path] if mode == "interpolate" else ["--mask", "left"] if mode == "inpaint" else []
        assert _cli(mode, workdir, overrides, "--input", path, "--solver", solver, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--solver {solver}" in err and key in err

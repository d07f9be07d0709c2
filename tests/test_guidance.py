"""Guidance layer against exact answers: mixtures whose components are the classes (data/class_conditional.py)."""
import math

import pytest
import torch

from data.class_conditional import mixture_class_score_fn, mixture_log_posterior_fn
from data.mixtures import GaussianMixture, toy_mixture
from errors import UserError
from evaluation.metrics import mode_weight_tv, mode_weights, sliced_wasserstein
from sde_lib import VESDE, VPSDE
from solvers import sample
from solvers.guidance import (check_class_label, classifier_free_guidance, classifier_guidance,
                              conditional_score)

SDE = VPSDE(0.1, 20.0, 1000)


def _ring():
    return toy_mixture("ring2d")


def _overlapping():
    """Four classes on a unit circle with std 0.7: the classes overlap, so p(c | x) is far from 0/1."""
    angles = torch.arange(4, dtype=torch.float64) * (math.pi / 2)
    means = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    return GaussianMixture(torch.ones(4), means, torch.full((4,), 0.7))


def _cfg_samples(mixture, label, w, n=2000, seed=0):
    class_score = mixture_class_score_fn(mixture, SDE)
    score = classifier_free_guidance(class_score, label, mixture.num_components, w)
    x, _ = sample(SDE, score, (n, 2), solver="em", nfe=200, generator=torch.Generator().manual_seed(seed),
                  dtype=torch.float64)
    return x


def test_cfg_w1_samples_the_class_only():
    ring = _ring()
    x = _cfg_samples(ring, 2, 1.0)
    weights = mode_weights(x, ring)
    assert weights[2] > 0.998, weights
    exact = ring.component(2).sample(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert float((x.mean(0) - ring.means[2]).norm()) < 0.03
    sw = float(sliced_wasserstein(x, exact, generator=torch.Generator().manual_seed(0)))
    assert sw < 0.05, sw


def test_cfg_w0_samples_the_mixture():
    ring = _ring()
    x = _cfg_samples(ring, 2, 0.0)
    assert mode_weight_tv(x, ring) < 0.06
    assert float(mode_weights(x, ring)[2]) < 0.2  # not the class


def test_cfg_scale_above_one_sharpens_the_class():
    mix = _overlapping()
    label = 1
    posterior = {}
    for w in (1.0, 2.0, 4.0):
        x = _cfg_samples(mix, label, w, n=3000)
        posterior[w] = float(mix.component_posterior(x)[:, label].mean())
    exact = mix.component(label).sample(20000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = float(mix.component_posterior(exact)[:, label].mean())
    assert abs(posterior[1.0] - expected) < 0.02, (posterior, expected)  # w = 1: the true class posterior
    assert posterior[2.0] > posterior[1.0] + 0.05 and posterior[4.0] > posterior[2.0] + 0.03, posterior


@pytest.mark.parametrize("sde", [SDE, VESDE(0.01, 10.0, 1000)])
def test_cfg_endpoints_equal_exact_scores_with_one_batched_call(sde):
    ring = _ring()
    calls = []
    exact_class = mixture_class_score_fn(ring, sde)

    def counted(x, t, y):
        calls.append((x.shape[0], sorted(set(y.tolist()))))
        return exact_class(x, t, y)

    x = torch.randn(16, 2, dtype=torch.float64) * 2
    t = torch.rand(16, dtype=torch.float64) * 0.9 + 0.05
    s1 = classifier_free_guidance(counted, 3, 8, 1.0)(x, t)
    assert calls == [(32, [3, 8])]
    torch.testing.assert_close(s1, ring.component(3).marginal_score(x, t, sde), rtol=1e-12, atol=1e-12)
    s0 = classifier_free_guidance(exact_class, 3, 8, 0.0)(x, t)
    torch.testing.assert_close(s0, ring.marginal_score(x, t, sde), rtol=1e-12, atol=1e-12)
    s3 = classifier_free_guidance(exact_class, 3, 8, 3.0)(x, t)
    torch.testing.assert_close(s3, 3 * s1 - 2 * s0)  # eq. 20.60
    torch.testing.assert_close(conditional_score(exact_class, 3)(x, t), s1)


@pytest.mark.parametrize("sde", [SDE, VESDE(0.01, 10.0, 1000)])
def test_classifier_guidance_with_exact_posterior_is_the_conditional_score(sde):
    ring = _ring()
    x = torch.randn(64, 2, dtype=torch.float64) * 2
    t = torch.rand(64, dtype=torch.float64) * 0.95 + 0.02
    labels = torch.arange(64) % 8
    guided = classifier_guidance(ring.score_fn(sde), mixture_log_posterior_fn(ring, sde), labels, 1.0)
    with torch.no_grad():  # guidance takes its own gradient
        got = guided(x, t)
    expected = mixture_class_score_fn(ring, sde)(x, t, labels)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # lambda = 0 leaves the unconditional score, lambda = 2 doubles the classifier term
    zero = classifier_guidance(ring.score_fn(sde), mixture_log_posterior_fn(ring, sde), labels, 0.0)(x, t)
    torch.testing.assert_close(zero, ring.marginal_score(x, t, sde))
    two = classifier_guidance(ring.score_fn(sde), mixture_log_posterior_fn(ring, sde), labels, 2.0)(x, t)
    torch.testing.assert_close(two, 2 * expected - zero, rtol=1e-10, atol=1e-10)


def test_classifier_guided_sampling_samples_the_class():
    ring = _ring()
    guided = classifier_guidance(ring.score_fn(SDE), mixture_log_posterior_fn(ring, SDE), 5, 1.0)
    x, _ = sample(SDE, guided, (1000, 2), solver="em", nfe=200, generator=torch.Generator().manual_seed(2),
                  dtype=torch.float64)
    assert float(mode_weights(x, ring)[5]) > 0.995


def test_class_label_errors():
    assert check_class_label(3, 10) == 3
    with pytest.raises(UserError, match="out of range"):
        check_class_label(10, 10)
    with pytest.raises(UserError, match="out of range"):
        check_class_label(-1, 10)
    with pytest.raises(UserError, match="unconditional"):
        check_class_label(0, 0)
    with pytest.raises(UserError, match="batch"):
        conditional_score(lambda x, t, y: x, torch.zeros(3, dtype=torch.long))(torch.zeros(4, 2), 0.5)


# --- networks, label dropout, labelled data, training, CLI ------------------------------------------------------
import configs  # noqa: E402
import main  # noqa: E402
import models  # noqa: E402
from data.loaders import ToyStream, check_num_classes, get_data_stream  # noqa: E402
from models.guidance import NoiseConditionalClassifier, classifier_log_prob_fn, conditional_score_fn  # noqa: E402
from training.losses import drop_labels  # noqa: E402


def _tiny_unet_config(num_classes):
    config = configs.get_config("vp_digits")
    config.model.nf, config.model.ch_mult, config.model.attn_resolutions = 8, (1, 2), ()
    config.model.init_scale = 1.0  # outputs of order one (the zero-scaled output layer would hide differences)
    config.data.num_classes = num_classes
    return config


@pytest.mark.parametrize("name", ["mlp", "ddpmpp"])
def test_class_conditional_network_adds_only_the_class_embedding(name):
    if name == "mlp":
        plain_cfg, cond_cfg = configs.get_config("vp_toy"), configs.get_config("vp_toy_cond")
    else:
        plain_cfg, cond_cfg = _tiny_unet_config(0), _tiny_unet_config(10)
    plain, cond = models.create_model(plain_cfg), models.create_model(cond_cfg)
    k = int(cond_cfg.data.num_classes)
    plain_names = dict(plain.named_parameters())
    cond_names = dict(cond.named_parameters())
    assert set(cond_names) - set(plain_names) == {"class_embed.weight"}
    assert all(cond_names[n].shape == p.shape for n, p in plain_names.items())
    assert cond.class_embed.weight.shape[0] == k + 1  # the null class is row k
    cond.load_state_dict({**plain.state_dict(), "class_embed.weight": torch.zeros_like(cond.class_embed.weight)})
    shape = (3, 2) if name == "mlp" else (3, 1, 8, 8)
    x, labels = torch.randn(shape), torch.rand(3) * 999
    with torch.no_grad():  # zero class embedding: the conditional net computes the unconditional function
        torch.testing.assert_close(cond(x, labels, class_labels=torch.tensor([0, 1, 2])), plain(x, labels))
        torch.nn.init.normal_(cond.class_embed.weight)
        null = torch.full((3,), k)
        torch.testing.assert_close(cond(x, labels), cond(x, labels, class_labels=null))  # None = null class
        assert not torch.allclose(cond(x, labels, class_labels=torch.tensor([0, 1, 2])), cond(x, labels))


def test_network_class_score_and_unconditional_errors():
    cfg = configs.get_config("vp_toy_cond")
    model = models.create_model(cfg)
    torch.nn.init.normal_(model.class_embed.weight)
    sde = VPSDE(0.1, 20.0, 1000)
    class_score = conditional_score_fn(sde, model)
    x, t = torch.randn(5, 2), torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(class_score(x, t, torch.full((5,), 8)), models.get_score_fn(sde, model)(x, t))
        torch.testing.assert_close(class_score(x, t, torch.full((5,), 2)),
                                   -model(x, t * 999, class_labels=torch.full((5,), 2)) / sde.marginal_std(t)[:, None])
    with pytest.raises(UserError, match="unconditional"):
        conditional_score_fn(sde, models.create_model(configs.get_config("vp_toy")))
    bad = configs.get_config("vp_toy_cond")
    bad.model.name = "ncsnv2"
    with pytest.raises(UserError, match="cannot be class-conditional"):
        models.create_model(bad)
    wrong = configs.get_config("vp_toy_cond")
    wrong.data.num_classes = 5
    with pytest.raises(UserError, match="has 8 classes"):
        check_num_classes(wrong)


def test_label_dropout():
    labels = torch.randint(0, 10, (20000,))
    g = torch.Generator().manual_seed(0)
    dropped = drop_labels(labels, 0.1, 10, g)
    null = dropped == 10
    assert abs(float(null.float().mean()) - 0.1) < 0.01
    assert torch.equal(dropped[~null], labels[~null])
    assert torch.equal(drop_labels(labels, 0.0, 10, g), labels)
    assert bool((drop_labels(labels, 1.0, 10, g) == 10).all())
    with pytest.raises(UserError, match="p_uncond"):
        drop_labels(labels, 1.5, 10)


def test_labelled_streams():
    stream = ToyStream("ring2d", 256, seed=1)
    x, y = stream.labelled_batch(3)
    assert torch.equal(x, stream.batch(3))  # the same draws as the unlabelled stream
    ring = _ring()
    assert float((ring.component_posterior(x.double()).argmax(1) == y).float().mean()) > 0.99
    with pytest.raises(UserError, match="no classes"):
        ToyStream("moons", 8, seed=1).labelled_batch(0)
    config = configs.get_config("vp_digits_cond")
    config.training.data_on_device = False
    images = get_data_stream(config, 16)
    from data.digits import load_digits_uint8
    _, all_labels = load_digits_uint8()
    _, labels = images.labelled_batch(2)
    assert torch.equal(labels, torch.as_tensor(all_labels)[images.indices(2)])


def _tiny_toy_cond(p_uncond):
    config = configs.get_config("vp_toy_cond")
    tr = config.training
    tr.n_iters, tr.batch_size, tr.log_every, tr.snapshot_every, tr.plot_samples, tr.progress = 15, 64, 15, 15, 0, False
    config.model.hidden_dim, config.model.num_layers, config.model.embedding_dim = 16, 1, 8
    config.model.p_uncond, config.device = p_uncond, "cpu"
    return config


@pytest.mark.parametrize("p_uncond", [0.0, 0.3])
def test_tiny_class_conditional_training_run(tmp_path, p_uncond):
    from training.trainer import train

    result = train(_tiny_toy_cond(p_uncond), str(tmp_path))
    assert result.step == 15 and math.isfinite(result.loss)
    rows = result.model.class_embed.weight.detach().abs().sum(1)
    assert bool((rows[:8] > 0).all())  # every class was trained
    # the null row (index 8) is trained only through label dropout
    assert (float(rows[8]) > 0) == (p_uncond > 0)


def test_noise_conditional_classifier_learns_the_exact_posterior(tmp_path):
    from training.classifier import load_classifier, train_classifier

    config = configs.get_config("vp_toy")  # an unconditional run can be guided by a classifier
    config.classifier.hidden_dim, config.classifier.num_layers, config.classifier.batch_size = 64, 2, 256
    config.classifier.lr, config.device = 3e-3, "cpu"
    summary = train_classifier(config, str(tmp_path), n_iters=300)
    classifier = load_classifier(config, str(tmp_path), torch.device("cpu"))
    ring, sde = _ring(), VPSDE(0.1, 20.0, 1000)
    x = ring.sample(2000, generator=torch.Generator().manual_seed(9))
    t = torch.full((2000,), 0.3)
    mean, std = sde.marginal_prob(x, t)
    x_t = mean + std[:, None] * torch.randn(x.shape, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        learned = classifier_log_prob_fn(classifier)(x_t, t).exp().double()
    exact = ring.component_posterior(x_t.double(), t.double(), sde)
    tv = float(0.5 * (learned - exact).abs().sum(1).mean())
    assert tv < 0.12, (tv, summary)
    assert summary["accuracy_at_t"]["0.01"] > 0.95


def test_classifier_network_shapes_and_errors(tmp_path):
    clf = NoiseConditionalClassifier(4, 3, hidden_dim=8, num_layers=1, embedding_dim=8)
    assert clf(torch.randn(5, 2, 2), torch.rand(5)).shape == (5, 3)
    with pytest.raises(UserError, match="input values"):
        clf(torch.randn(5, 3), torch.rand(5))
    from training.classifier import load_classifier
    with pytest.raises(UserError, match="no classifier"):
        load_classifier(configs.get_config("vp_toy"), str(tmp_path), torch.device("cpu"))


def test_sample_cli_guidance_errors(tmp_path, capsys):
    def run(*extra, config="vp_toy_cond"):
        return main.main(["--mode", "sample", "--config", config, "--workdir", str(tmp_path), *extra])
    assert run("--guidance", "cfg", "--class_label", "1", config="vp_toy") == 2
    assert "unconditional" in capsys.readouterr().err
    assert run("--class_label", "0", config="vp_toy") == 2
    assert "unconditional" in capsys.readouterr().err
    assert run("--guidance", "cfg", "--class_label", "8") == 2
    assert "out of range" in capsys.readouterr().err
    assert run("--guidance", "cfg") == 2
    assert "needs --class_label" in capsys.readouterr().err
    assert run("--guidance_scale", "2", "--class_label", "1") == 2
    assert "needs --guidance" in capsys.readouterr().err
    assert run("--guidance", "classifier", "--class_label", "-1", config="vp_toy") == 2
    assert "out of range" in capsys.readouterr().err


def test_sample_cli_classifier_free_guidance_end_to_end(tmp_path):
    import glob
    import json
    import os

    from test_sample_cli import _write_untrained_checkpoint

    config = _tiny_toy_cond(0.1)
    small = ["--config.model.hidden_dim=16", "--config.model.num_layers=1", "--config.model.embedding_dim=8"]
    _write_untrained_checkpoint(config, str(tmp_path))
    code = main.main(["--mode", "sample", "--config", "vp_toy_cond", "--workdir", str(tmp_path), "--nfe", "10",
                      "--num_samples", "50", "--class_label", "3", "--guidance", "cfg", "--guidance_scale", "2.5",
                      *small])
    assert code == 0
    (npz,) = glob.glob(os.path.join(str(tmp_path), "samples", "samples_em_nfe10_seed42_class3_cfg2.5_h*.npz"))
    stem = npz[:-len(".npz")]
    info = json.load(open(stem + ".json"))
    assert info["guidance"] == "cfg" and info["class_label"] == 3 and info["guidance_scale"] == 2.5
    assert info["nfe_used"] == 10  # one (batched) network call per step


def test_guidance_scales_that_differ_get_different_result_names(tmp_path):
    """`:g` showed 2, 2.0000001 and 1.9999999 all as `cfg2`: each run replaced the last one's samples."""
    import argparse
    import os

    import configs
    from evaluation.sample_runner import output_stem

    config = configs.get_config("vp_toy_cond")
    stems = {}
    for scale in (2.0, 2.0000001, 1.9999999, 0.5, None):
        args = argparse.Namespace(config="vp_toy_cond", solver="em", nfe=4, num_samples=8, class_label=3,
                                  guidance="cfg", guidance_scale=scale)
        stems[scale] = os.path.basename(output_stem(config, args, str(tmp_path), "samples")[0])
    assert len(set(stems.values())) == 5  # None is the default scale 1
    assert "_class3_cfg2_" in stems[2.0] + "_" and "_cfg0.5" in stems[0.5] and "_cfg1" in stems[None]
    assert "_cfg2.0000001" in stems[2.0000001] and "_cfg1.9999999" in stems[1.9999999]


def test_classifier_training_is_reproducible_and_never_replaces_a_trained_one(tmp_path):
    """Same config.seed, same classifier (its initial weights were unseeded); a second run in the same workdir is
    refused in one line instead of silently replacing the classifier guided samples were drawn with."""
    from training.checkpoint import read_verified
    from training.classifier import classifier_path, train_classifier

    config = configs.get_config("vp_toy")
    config.classifier.hidden_dim, config.classifier.num_layers, config.classifier.batch_size = 16, 1, 32
    config.device = "cpu"
    for name in ("a", "b"):
        train_classifier(config, str(tmp_path / name), n_iters=3)
    first, second = (read_verified(classifier_path(str(tmp_path / n)), "classifier")["state_dict"] for n in "ab")
    assert all(torch.equal(first[k], second[k]) for k in first)
    before = open(classifier_path(str(tmp_path / "a")), "rb").read()
    with pytest.raises(UserError, match="classifier.pt exists .*delete it"):
        train_classifier(config, str(tmp_path / "a"), n_iters=3)
    assert open(classifier_path(str(tmp_path / "a")), "rb").read() == before


def test_classifier_guided_results_are_named_by_their_classifier(tmp_path):
    """Samples guided by another classifier (deleted and retrained) no longer replace the earlier ones."""
    import argparse
    import os

    import configs
    from evaluation.sample_runner import output_stem
    from training.checkpoint import save_checkpoint
    from training.classifier import classifier_path

    config = configs.get_config("vp_toy")
    args = argparse.Namespace(config="vp_toy", solver="em", nfe=4, num_samples=8, class_label=3,
                              guidance="classifier", guidance_scale=1.0)
    stems = []
    for seed in (0, 1):
        save_checkpoint(classifier_path(str(tmp_path)), {"state_dict": {"w": torch.full((2,), float(seed))}})
        stems.append(os.path.basename(output_stem(config, args, str(tmp_path), "samples")[0]))
    assert stems[0] != stems[1] and all("_class3_classifier1_h" in s for s in stems)

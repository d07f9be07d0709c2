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

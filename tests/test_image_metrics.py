"""FID / KID / IS on features, against closed forms and independent float64 computations (no network)."""
import numpy as np
import pytest
import scipy.special
from scipy.stats import ortho_group

from evaluation.image_metrics import (feature_statistics, frechet_distance, frechet_distance_to_features,
                                      inception_score, kid, mmd2_unbiased, polynomial_kernel, trace_sqrt_product)


def _commuting_pair(d, l1, l2, seed):
    """Two covariances U diag(l) U^T sharing eigenvectors: W2^2 has the closed form sum (sqrt l1 - sqrt l2)^2."""
    u = ortho_group.rvs(d, random_state=seed)
    return u @ np.diag(l1) @ u.T, u @ np.diag(l2) @ u.T


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_frechet_commuting_covariances_closed_form(rank_deficient):
    rng = np.random.default_rng(0)
    d = 40
    l1, l2 = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    if rank_deficient:  # exactly singular and near-singular directions (l = 0 and l = 1e-12)
        l1[:10], l2[5:15] = 0.0, 1e-12
    s1, s2 = _commuting_pair(d, l1, l2, seed=1)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    # a square root near 0 amplifies round-off: eigenvalues of order 1e-12 are known to sqrt(eps * 16) ~ 6e-8
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-10, abs=5e-7 if rank_deficient else 1e-9)


def test_frechet_2d_non_commuting_closed_form():
    # For 2x2 PSD matrices Tr((S1 S2)^1/2) = sqrt(Tr(S1 S2) + 2 sqrt(det S1 det S2)), incl. a singular S1.
    s2 = np.array([[2.0, 0.7], [0.7, 0.5]])
    for s1 in (np.array([[1.0, -0.4], [-0.4, 3.0]]), np.array([[1.0, 2.0], [2.0, 4.0]]),
               np.array([[1.0, 2.0], [2.0, 4.0 + 1e-10]])):
        exact = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(max(np.linalg.det(s1) * np.linalg.det(s2), 0.0)))
        assert trace_sqrt_product(s1, s2) == pytest.approx(exact, rel=1e-9)
        mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 2.0])
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * exact
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("d,r", [(50, 50), (200, 20)])
def test_trace_sqrt_low_rank_against_nuclear_norm(d, r):
    # S1 = A A^T, S2 = B B^T (rank r, singular when r < d, as covariances of fewer samples than dimensions):
    # the eigenvalues of S1 S2 are the squared singular values of A^T B, so Tr((S1 S2)^1/2) = ||A^T B||_*.
    rng = np.random.default_rng(d)
    a, b = rng.normal(size=(d, r)), 2.0 * rng.normal(size=(d, r))
    exact = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    assert trace_sqrt_product(a @ a.T, b @ b.T) == pytest.approx(exact, rel=1e-10)


def test_frechet_general_matches_independent_float64_route():
    # independent route: eigenvalues of the non-symmetric product S1 S2 (real, >= 0), summed square roots
    rng = np.random.default_rng(3)
    d = 30
    x, y = rng.normal(size=(200, d)), rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) * 0.5 + 1.0
    (mu1, s1), (mu2, s2) = feature_statistics(x), feature_statistics(y)
    eig = np.linalg.eigvals(s1 @ s2)
    independent = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(independent, rel=1e-8)


@pytest.mark.parametrize("n", [5, 30, 80])
def test_frechet_distance_to_features_equals_the_general_route(n):
    rng = np.random.default_rng(n)
    d = 30
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    mu2, s2 = feature_statistics(rng.normal(size=(50, d)) + 0.2)
    general = frechet_distance(*feature_statistics(x), mu2, s2)
    assert frechet_distance_to_features(x, mu2, s2) == pytest.approx(general, rel=1e-9)
    assert frechet_distance_to_features(x, *feature_statistics(x)) == pytest.approx(0.0, abs=1e-9 * general)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20, 64))  # fewer samples than dimensions: a singular covariance
    mu, sigma = feature_statistics(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9 * np.trace(sigma))
    assert frechet_distance(mu, sigma, mu + 1.0, sigma) == pytest.approx(64.0, rel=1e-8)


def test_feature_statistics_unbiased():
    x = np.random.default_rng(5).normal(size=(30, 4))
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-12)


def test_mmd2_unbiased_against_written_out_formula():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 0.3
    d = 5

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert polynomial_kernel(x, y)[2, 3] == pytest.approx(k(x[2], y[3]), rel=1e-14)


def test_kid_subsets_and_expectation():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(60, 8)), rng.normal(size=(80, 8))
    # one subset as large as the smaller set: the mean is the estimator on those rows
    mean, std = kid(a, b, num_subsets=1, subset_size=1000, seed=3)
    rows = np.random.default_rng(3)
    ia, ib = rows.choice(60, 60, replace=False), rows.choice(80, 60, replace=False)
    assert mean == pytest.approx(mmd2_unbiased(a[ia], b[ib]), rel=1e-12) and std == 0.0
    # equal distributions: ~0 in expectation (unbiased); average over independent draws, seeded
    values = [kid(rng.normal(size=(50, 8)), rng.normal(size=(50, 8)), num_subsets=5, subset_size=40, seed=s)[0]
              for s in range(40)]
    se = np.std(values) / np.sqrt(len(values))
    assert abs(np.mean(values)) < 4 * se
    # a shifted distribution is clearly positive
    shifted = kid(rng.normal(size=(50, 8)), rng.normal(size=(50, 8)) + 1.0, num_subsets=5, subset_size=40)[0]
    assert shifted > 10 * se + abs(np.mean(values))
    # same seed, same answer
    assert kid(a, b, num_subsets=4, subset_size=20, seed=1) == kid(a, b, num_subsets=4, subset_size=20, seed=1)


def test_inception_score_closed_forms():
    k = 10
    # confident and uniform over classes: IS = K; all samples the same class: IS = 1
    assert inception_score(np.eye(k), splits=1, probs=True) == pytest.approx((k, 0.0))
    assert inception_score(np.tile(np.eye(k)[:1], (k, 1)), splits=1, probs=True)[0] == pytest.approx(1.0)
    # logits: exp(mean KL(p(y|x) || p(y))) written out
    logits = np.random.default_rng(8).normal(size=(40, k)) * 2
    p = scipy.special.softmax(logits, axis=1)
    parts = []
    for chunk in np.array_split(p, 4):
        marginal = chunk.mean(0)
        parts.append(np.exp(np.mean(np.sum(chunk * (np.log(chunk) - np.log(marginal)), axis=1))))
    assert inception_score(logits, splits=4) == pytest.approx((np.mean(parts), np.std(parts)), rel=1e-10)
    assert inception_score(p, splits=4, probs=True) == pytest.approx((np.mean(parts), np.std(parts)), rel=1e-10)
    with pytest.raises(ValueError):
        inception_score(logits[:3], splits=4)
    # N not divisible by the splits: parts [k N / splits, (k + 1) N / splits) as Salimans et al.'s code and
    # torch-fidelity (np.array_split puts the extra rows first: 103 rows in 10 parts gave another IS)
    logits = np.random.default_rng(9).normal(size=(103, k)) * 2
    p = scipy.special.softmax(logits, axis=1)
    parts = []
    for i in range(10):
        chunk = p[i * 103 // 10:(i + 1) * 103 // 10]
        parts.append(np.exp(np.mean(np.sum(chunk * (np.log(chunk) - np.log(chunk.mean(0))), axis=1))))
    assert inception_score(logits, splits=10) == pytest.approx((np.mean(parts), np.std(parts)), rel=1e-10)

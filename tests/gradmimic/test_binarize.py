"""Per-step binarisers against brute force (every split of the sorted values) and scikit-learn's EM."""

import numpy as np
import pytest

from gradmimic.binarize import binned_summary, exact_summary, gmm_fit, gmm_keep, kmeans_split
from tests.support.binarize import brute_kmeans


def mixture_steps(T, B, seed):
    rng = np.random.default_rng(seed)
    good = rng.random((T, B)) < 0.7
    return np.where(good, rng.normal(1.0, 0.6, (T, B)), rng.normal(-1.5, 0.8, (T, B)))


def test_kmeans_split_is_the_optimal_partition():
    values = mixture_steps(40, 25, seed=0)
    got = kmeans_split(*exact_summary(values))[:, 0]
    want = np.array([brute_kmeans(v) for v in values])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_kmeans_padded_rows_and_degenerate_steps():
    values = np.array([[1.0, 1.0, 1.0, 9.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 0.0, 0.0]])
    valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], bool)  # row 0: only equal values remain
    got = kmeans_split(*exact_summary(values, valid))
    assert np.isinf(got[0, 0]) and np.isinf(got[1, 0])  # nothing to split: keep nobody
    assert got[2, 0] == 2.5


def test_binned_kmeans_equals_exact_when_bins_separate_the_split():
    values = mixture_steps(30, 32, seed=1)
    lo, hi = values.min(1), values.max(1)
    step = np.repeat(np.arange(30), 32)
    s = binned_summary(step, values.ravel(), lo, hi, 4096, 30)
    got = kmeans_split(s["count"], s["sum"], s["sumsq"])[:, 0]
    want = np.array([brute_kmeans(v) for v in values])
    # the split falls between two neighbours at least one bin apart: same partition, same centroids
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # and with a coarse grid the decisions still agree on almost every value
    s = binned_summary(step, values.ravel(), lo, hi, 32, 30)
    coarse = kmeans_split(s["count"], s["sum"], s["sumsq"])[:, 0]
    assert np.mean((values > coarse[:, None]) != (values > want[:, None])) < 0.03


@pytest.mark.filterwarnings("ignore:Best performing initialization")
def test_gmm_matches_scikit_learn_em():
    from sklearn.mixture import GaussianMixture

    values = mixture_steps(12, 200, seed=2)
    params = gmm_fit(*exact_summary(values), iters=300, tol=0)
    for v, p in zip(values, params):
        km = brute_kmeans(v)
        lo, hi = v[v <= km], v[v > km]
        ref = GaussianMixture(2, covariance_type="full", tol=0, max_iter=300, reg_covar=1e-12,
                              weights_init=[len(lo) / len(v), len(hi) / len(v)], means_init=[[lo.mean()], [hi.mean()]],
                              precisions_init=[[[1 / lo.var()]], [[1 / hi.var()]]]).fit(v[:, None])
        order = np.argsort(ref.means_.ravel())
        want = np.stack([ref.weights_[order], ref.means_.ravel()[order], ref.covariances_.ravel()[order]], 1).ravel()
        np.testing.assert_allclose(p, want, rtol=1e-4, atol=1e-6)
        keep = gmm_keep(v, np.broadcast_to(p, (len(v), 6)))
        post = ref.predict_proba(v[:, None])[:, order[1]]
        np.testing.assert_array_equal(keep, post > 0.5)


@pytest.mark.parametrize("bins", [64, 256])
def test_binned_gmm_is_close_to_exact(bins):
    values = mixture_steps(20, 256, seed=3)
    exact = gmm_fit(*exact_summary(values))
    step = np.repeat(np.arange(20), 256)
    s = binned_summary(step, values.ravel(), values.min(1), values.max(1), bins, 20)
    binned = gmm_fit(s["count"], s["sum"], s["sumsq"])
    flat = values.ravel()
    a = gmm_keep(flat, exact[step])
    b = gmm_keep(flat, binned[step])
    assert np.mean(a != b) < (0.01 if bins == 256 else 0.03)


def test_gmm_early_stopping_barely_changes_decisions():
    values = mixture_steps(200, 128, seed=4)
    step = np.repeat(np.arange(200), 128)
    settled = gmm_fit(*exact_summary(values), iters=400, tol=0)
    quick = gmm_fit(*exact_summary(values))
    flat = values.ravel()
    assert np.mean(gmm_keep(flat, quick[step]) != gmm_keep(flat, settled[step])) < 0.005

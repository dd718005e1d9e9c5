"""Inf-FS against a direct, loop-by-loop computation of the ICCV 2015 formulation."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from nisp_onnx import infs_scores
from nisp_onnx.infs import _path_scores


def dense_infs(x, alpha=0.5):
    d = x.shape[1]
    std = x.std(axis=0)
    sigma = np.array([[max(std[i], std[j]) for j in range(d)] for i in range(d)])
    sigma = (sigma - sigma.min()) / (sigma.max() - sigma.min())
    corr = np.array([[spearmanr(x[:, i], x[:, j])[0] for j in range(d)] for i in range(d)])
    a = alpha * sigma + (1 - alpha) * (1 - np.abs(corr))
    r = 0.9 / max(abs(np.linalg.eigvals(a)))
    s = np.linalg.inv(np.eye(d) - r * a) - np.eye(d)
    return s.sum(axis=1), a


@pytest.mark.parametrize("d", [7, 100])  # 100: spectral radius by Lanczos, not dense
def test_matches_dense_computation(d):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, d)) * rng.uniform(0.2, 3, d)
    x[:, 3] = x[:, 1] * 2 + 0.01 * rng.standard_normal(40)  # a redundant pair
    want, _ = dense_infs(x)
    np.testing.assert_allclose(infs_scores(x), want, rtol=1e-8)


@pytest.mark.parametrize("alpha", [0.2, 0.9])
def test_alpha_weighs_spread_against_decorrelation(alpha):
    """alpha weighs the spread term, 1 - alpha the decorrelation term (at the 0.5 of every
    other test a swap of the two would pass)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 8)) * rng.uniform(0.2, 3, 8)
    x[:, 5] = x[:, 2] * 3 + 0.01 * rng.standard_normal(40)
    np.testing.assert_allclose(infs_scores(x, alpha=alpha), dense_infs(x, alpha)[0], rtol=1e-8)
    assert not np.allclose(infs_scores(x, alpha=alpha), dense_infs(x, 1 - alpha)[0], rtol=1e-3)


def test_ties_in_ranks_match_scipy():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (30, 5)).astype(float)
    np.testing.assert_allclose(infs_scores(x), dense_infs(x)[0], rtol=1e-8)


def test_dead_features_score_zero():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((25, 6))
    x[:, 2] = 0.0
    x[:, 4] = 3.5
    s = infs_scores(x)
    assert s[2] == 0 and s[4] == 0
    assert (np.delete(s, [2, 4]) > 0).all()
    live = np.delete(x, [2, 4], axis=1)
    np.testing.assert_allclose(np.delete(s, [2, 4]), dense_infs(live)[0], rtol=1e-8)


def test_ranking_close_to_degree_centrality():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 30)) * rng.uniform(0.1, 5, 30)
    s, a = dense_infs(x)
    assert spearmanr(infs_scores(x), a.sum(axis=1))[0] > 0.95


@pytest.mark.parametrize("symmetric", [True, False])
def test_path_scores_are_the_row_sums_of_the_inverse(symmetric):
    """One solve against ones (Cholesky where symmetric) and rho by Lanczos/Arnoldi give the
    row sums of (I - r A)^-1 - I of the dense formula, for a non-negative affinity."""
    a = np.random.default_rng(2).random((100, 100))
    if symmetric:
        a = (a + a.T) / 2
    r = 0.9 / max(abs(np.linalg.eigvals(a)))
    want = (np.linalg.inv(np.eye(100) - r * a) - np.eye(100)).sum(axis=1)
    np.testing.assert_allclose(_path_scores(a, 0.9), want, rtol=1e-9)

"""Inf-FS feature ranking (Roffo, Melzi & Cristani, ICCV 2015) of final-response features."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve
from scipy.sparse.linalg import ArpackNoConvergence, eigs, eigsh
from scipy.stats import rankdata


def infs_scores(x: np.ndarray, alpha: float = 0.5, factor: float = 0.9) -> np.ndarray:
    """Inf-FS score of each column of `x` (N samples x D features); higher is more important.

    A = alpha * Sigma + (1 - alpha) * (1 - |Spearman|), Sigma_ij = max(std_i, std_j) scaled
    to [0, 1]; r = factor / rho(A); scores are the row sums of (I - r A)^-1 - I.
    Constant (dead) features score 0.
    """

    def affinity(xl: np.ndarray, std: np.ndarray) -> np.ndarray:
        return alpha * _spread(std) + (1 - alpha) * (1 - np.abs(spearman(xl)))

    return _ranked(x, affinity, factor)


def supervised_infs_scores(x: np.ndarray, y: np.ndarray, factor: float = 0.9) -> np.ndarray:
    """Supervised Inf-FS (Roffo et al., TPAMI 2020) of the columns of `x` for labels `y`.

    Per feature: mutual information m with the labels (quantile-binned), the multi-class
    Fisher score f = sum_c n_c (mu_c - mu)^2 / sum_c n_c var_c, and the spread
    sigma_ij = max(std_i, std_j), each scaled to [0, 1];
    A_ij = ((m_i + f_j) + (m_i + sigma_ij) + (sigma_ij + f_j)) / 6, then the same path
    scores as the unsupervised ranking. Constant features score 0.
    """
    y = np.unique(np.asarray(y), return_inverse=True)[1]

    def affinity(xl: np.ndarray, std: np.ndarray) -> np.ndarray:
        m = _unit(mutual_information(xl, y))[:, None]
        f = _unit(fisher_scores(xl, y))[None, :]
        sigma = _spread(std)
        return ((m + f) + (m + sigma) + (sigma + f)) / 6

    return _ranked(x, affinity, factor)


def _ranked(x: np.ndarray, affinity: Callable, factor: float) -> np.ndarray:
    """Path scores of the live (non-constant) columns of `x` under `affinity(x_live, std)`;
    constant columns score 0."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    std = x.std(axis=0)
    live = std > 1e-12 * max(1.0, float(np.abs(x).max(initial=0.0)))
    scores = np.zeros(d)
    if live.sum() < 2 or n < 2:
        scores[live] = 1.0
        return scores
    scores[live] = _path_scores(affinity(x[:, live], std[live]), factor)
    return scores


def fisher_scores(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Multi-class Fisher score of each column: between-class over within-class variance."""
    mu = x.mean(axis=0)
    between = np.zeros(x.shape[1])
    within = np.zeros(x.shape[1])
    for c in np.unique(y):
        xc = x[y == c]
        between += len(xc) * (xc.mean(axis=0) - mu) ** 2
        within += len(xc) * xc.var(axis=0)
    if within.max() <= 0:  # one sample per class: every feature separates them equally
        return np.ones(x.shape[1])
    return between / np.maximum(within, 1e-12 * float(within.max()))


def mutual_information(x: np.ndarray, y: np.ndarray, bins: int = 10) -> np.ndarray:
    """Mutual information (nats) between each column, cut into quantile bins, and labels."""
    n, d = x.shape
    edges = np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1], axis=0)  # [bins-1, d]
    binned = (x[:, None, :] > edges[None]).sum(axis=1)  # [n, d] in 0..bins-1
    k = int(y.max()) + 1
    joint = np.zeros((d, bins, k))
    np.add.at(joint, (np.arange(d)[None, :], binned, y[:, None]), 1.0)
    joint /= n
    px = joint.sum(axis=2, keepdims=True)
    py = joint.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log(joint / (px * py)), 0.0)
    return terms.sum(axis=(1, 2))


def _unit(v: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] (all ones when constant)."""
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.ones_like(v)


def _spread(std: np.ndarray) -> np.ndarray:
    return _unit(np.maximum.outer(std, std))


def _path_scores(a: np.ndarray, factor: float) -> np.ndarray:
    """Row sums of (I - r A)^-1 - I with r = factor / rho(A): every path through a feature.

    The row sums are (I - r A)^-1 1 - 1, one solve against a vector of ones; for symmetric A
    by Cholesky, since I - r A is positive definite (its eigenvalues lie in [1 - factor,
    1 + factor])."""
    sym = np.allclose(a, a.T)
    m = np.eye(len(a)) - factor / _spectral_radius(a, sym) * a
    ones = np.ones(len(a))
    if sym:
        return cho_solve(cho_factor(m, check_finite=False), ones, check_finite=False) - 1
    return solve(m, ones, check_finite=False) - 1


def _spectral_radius(a: np.ndarray, sym: bool) -> float:
    """Largest eigenvalue magnitude: dense for small matrices, else by Lanczos/Arnoldi
    started from the ones vector (deterministic)."""
    if len(a) > 64:
        v0 = np.ones(len(a))
        try:
            top = eigsh(a, k=1, which="LM", v0=v0) if sym else eigs(a, k=1, which="LM", v0=v0)
            return float(np.abs(top[0]).max())
        except ArpackNoConvergence:
            pass
    return float(np.max(np.abs(np.linalg.eigvalsh(a) if sym else np.linalg.eigvals(a))))


def spearman(x: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between the columns of `x` (average ranks for ties)."""
    ranks = rankdata(x, axis=0)
    ranks -= ranks.mean(axis=0)
    ranks /= np.linalg.norm(ranks, axis=0)
    return np.clip(ranks.T @ ranks, -1.0, 1.0)

"""Inf-FS feature ranking (Roffo, Melzi & Cristani, ICCV 2015) of final-response features."""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve
from scipy.stats import rankdata


def infs_scores(x: np.ndarray, alpha: float = 0.5, factor: float = 0.9) -> np.ndarray:
    """Inf-FS score of each column of `x` (N samples x D features); higher is more important.

    A = alpha * Sigma + (1 - alpha) * (1 - |Spearman|), Sigma_ij = max(std_i, std_j) scaled
    to [0, 1]; r = factor / rho(A); scores are the row sums of (I - r A)^-1 - I.
    Constant (dead) features score 0.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    std = x.std(axis=0)
    live = std > 1e-12 * max(1.0, float(np.abs(x).max(initial=0.0)))
    scores = np.zeros(d)
    if live.sum() < 2 or n < 2:
        scores[live] = 1.0
        return scores
    xl, sl = x[:, live], std[live]
    sigma = np.maximum.outer(sl, sl)
    span = sigma.max() - sigma.min()
    sigma = (sigma - sigma.min()) / span if span > 0 else np.ones_like(sigma)
    a = alpha * sigma + (1 - alpha) * (1 - np.abs(spearman(xl)))
    rho = np.max(np.abs(np.linalg.eigvalsh(a)))
    r = factor / rho
    eye = np.eye(len(a))
    scores[live] = (solve(eye - r * a, eye, assume_a="sym") - eye).sum(axis=1)
    return scores


def spearman(x: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between the columns of `x` (average ranks for ties)."""
    ranks = rankdata(x, axis=0)
    ranks -= ranks.mean(axis=0)
    ranks /= np.linalg.norm(ranks, axis=0)
    return np.clip(ranks.T @ ranks, -1.0, 1.0)

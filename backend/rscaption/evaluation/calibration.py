"""Calibration maths: AUROC, expected calibration error, temperature and logistic fits.

Small and dependency-free (numpy only) because the fitted numbers ship inside the model's
config.json and must be reproducible from the val data by anyone.
"""

from __future__ import annotations

import numpy as np


def auroc(scores, correct) -> float:
    """Area under the ROC curve of ``scores`` for separating ``correct`` from wrong, with ties
    counted half (the Mann-Whitney statistic). NaN when only one outcome occurs."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ece(confidence, correct, bins: int = 10) -> float:
    """Expected calibration error: the sample-weighted mean |accuracy - mean confidence| over
    equal-width confidence bins."""
    c = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(correct, dtype=np.float64)
    if len(c) == 0:
        return float("nan")
    idx = np.minimum((c * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(y[m].mean() - c[m].mean())
    return float(total / len(c))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def fit_temperature(logits: np.ndarray, positives: np.ndarray, grid=None) -> float:
    """Temperature minimising the negative log of the softmax mass on the right classes
    (several may be right); a 1-D search is enough for one parameter and cannot diverge."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121)) if grid is None else np.asarray(grid)
    pos = np.asarray(positives, dtype=bool)
    best, best_t = np.inf, 1.0
    for t in grid:
        p = softmax(logits / t)
        nll = -np.log(np.clip((p * pos).sum(1), 1e-12, None)).mean()
        if nll < best:
            best, best_t = nll, float(t)
    return best_t


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40, 40)))


def fit_logistic(x: np.ndarray, y, l2: float = 1e-2, iters: int = 50) -> tuple[np.ndarray, float]:
    """Logistic regression by Newton's method with a small L2 penalty on the weights (not the
    bias): ``P(y=1 | x) = sigmoid(x @ w + b)``. Features are few (a handful), so the Hessian
    solve is trivial and the fit converges in a few steps without a learning rate to tune."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, f = x.shape
    xa = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(f + 1)
    reg = np.full(f + 1, l2 * n)
    reg[-1] = 0.0
    for _ in range(iters):
        p = sigmoid(xa @ theta)
        grad = xa.T @ (p - y) + reg * theta
        w = p * (1 - p)
        hess = (xa * w[:, None]).T @ xa + np.diag(reg) + 1e-9 * np.eye(f + 1)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return theta[:-1], float(theta[-1])


def reliability(confidence, correct, bins: int = 10) -> list[dict]:
    """Per-bin counts, mean confidence and accuracy (the numbers behind a reliability diagram)."""
    c = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(correct, dtype=np.float64)
    idx = np.minimum((c * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append({"bin": [b / bins, (b + 1) / bins], "n": int(m.sum()),
                        "confidence": round(float(c[m].mean()), 4), "accuracy": round(float(y[m].mean()), 4)})
    return out

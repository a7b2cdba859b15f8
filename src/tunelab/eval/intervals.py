"""95% intervals for held-out metrics: Wilson for proportions, bootstrap for macro-F1.

* :func:`wilson_interval`: the Wilson score interval of a binomial proportion (Wilson 1927, JASA 22:
  209-212), used for accuracy and pairwise accuracy: ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``.
* :func:`bootstrap_macro_f1`: the percentile bootstrap (Efron & Tibshirani 1993, ch. 13) of macro-F1.
  Resampling the n held-out examples with replacement is the same as drawing the K × K confusion
  matrix from a multinomial with n trials and the observed cell shares, so only the confusion matrix
  is needed. Simplification: percentile interval, not BCa.
"""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927), 95% by default.

    Returns ``(low, high)``; ``(0.0, 1.0)`` for zero trials.
    """
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def macro_f1_from_confusion(matrix: np.ndarray) -> np.ndarray:
    """Macro-F1 of confusion matrices ``(..., K, K)`` (rows true, columns predicted), int counts.

    F1 of class k = 2·TP / (2·TP + FP + FN), 0 when the class is neither present nor predicted (as
    scikit-learn's ``zero_division=0``); the mean over all K classes. Returns shape ``(...)``, float64.
    """
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    denom = m.sum(axis=-1) + m.sum(axis=-2)  # (TP + FN) + (TP + FP)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1.mean(axis=-1)


def bootstrap_macro_f1(matrix: list[list[int]] | np.ndarray, *, num_resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval ``(low, high)`` of macro-F1 from a K × K confusion matrix.

    Deterministic in ``seed``. Raises ValueError for an empty or non-square matrix.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.sum() == 0:
        raise ValueError(f"need a non-empty square confusion matrix, got shape {counts.shape}")
    k, n = counts.shape[0], int(counts.sum())
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts.ravel() / n, size=num_resamples).reshape(num_resamples, k, k)
    scores = macro_f1_from_confusion(draws)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(scores, [tail, 100 - tail])
    return float(low), float(high)


def classification_intervals(matrix: list[list[int]], seed: int = 0) -> dict[str, float]:
    """95% intervals of accuracy (Wilson) and macro-F1 (bootstrap) from a confusion matrix.

    Keys: ``accuracy_low``, ``accuracy_high``, ``macro_f1_low``, ``macro_f1_high``.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    acc_low, acc_high = wilson_interval(int(np.trace(counts)), int(counts.sum()))
    f1_low, f1_high = bootstrap_macro_f1(counts, seed=seed)
    return {"accuracy_low": acc_low, "accuracy_high": acc_high, "macro_f1_low": f1_low, "macro_f1_high": f1_high}

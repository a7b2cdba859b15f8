"""95% intervals of held-out classification metrics (issue 18: PubMedQA accuracy and macro-F1 with an
interval). New module: every test fails on the old code."""

import numpy as np
import pytest

from tunelab.eval.intervals import (
    bootstrap_macro_f1, classification_intervals, macro_f1_from_confusion, wilson_interval,
)


def test_macro_f1_from_confusion_by_hand():
    # class 0: TP 3, FN 1, FP 2 → 6/9; class 1: TP 4, FN 2, FP 1 → 8/11; class 2 absent and never
    # predicted → 0 (scikit-learn's zero_division=0 over all labels)
    matrix = [[3, 1, 0], [2, 4, 0], [0, 0, 0]]
    assert macro_f1_from_confusion(matrix) == pytest.approx((6 / 9 + 8 / 11 + 0) / 3)
    assert macro_f1_from_confusion(np.array([matrix, np.eye(3, dtype=int)])).shape == (2,)


def test_macro_f1_matches_scikit_learn_on_random_predictions():
    from sklearn.metrics import confusion_matrix, f1_score

    rng = np.random.default_rng(1)
    y_true, y_pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    matrix = confusion_matrix(y_true, y_pred, labels=range(4))
    assert macro_f1_from_confusion(matrix) == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_bootstrap_interval_brackets_the_estimate_is_seeded_and_shrinks_with_n():
    matrix = np.array([[50, 10, 5], [12, 30, 4], [6, 5, 8]])
    point = float(macro_f1_from_confusion(matrix))
    low, high = bootstrap_macro_f1(matrix, seed=3)
    assert low < point < high and (low, high) == bootstrap_macro_f1(matrix, seed=3)
    big_low, big_high = bootstrap_macro_f1(matrix * 16, seed=3)
    assert big_high - big_low < (high - low) / 2.5  # width ∝ 1/sqrt(n): 16× the data, about 1/4 the width
    assert bootstrap_macro_f1(np.diag([50, 50]))[0] == 1.0  # no error to resample


def test_bootstrap_refuses_an_empty_or_non_square_matrix():
    with pytest.raises(ValueError, match="square"):
        bootstrap_macro_f1([[1, 2, 3]])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_macro_f1([[0, 0], [0, 0]])


def test_classification_intervals_use_wilson_for_accuracy():
    matrix = [[40, 10], [5, 45]]
    out = classification_intervals(matrix)
    assert (out["accuracy_low"], out["accuracy_high"]) == wilson_interval(85, 100)
    assert out["macro_f1_low"] < macro_f1_from_confusion(matrix) < out["macro_f1_high"]


def test_wilson_still_importable_from_the_reward_recipe():
    from tunelab.recipes.reward import wilson_interval as from_reward

    assert from_reward is wilson_interval

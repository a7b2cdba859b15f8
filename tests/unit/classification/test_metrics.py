"""Evaluation metrics on hand-made predictions, with the expected values worked out by hand."""

import numpy as np
import pytest

from tunelab.eval.classification import classification_metrics, plot_confusion_matrix

NAMES = ["neg", "neu", "pos"]


def one_hot_logits(pred_ids, k=3):
    logits = np.full((len(pred_ids), k), -2.0)
    logits[np.arange(len(pred_ids)), pred_ids] = 2.0
    return logits


def test_single_label_metrics_by_hand(tmp_path):
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics("single_label", y_true, one_hot_logits(y_pred), NAMES)
    # neg: TP 1, FP 1, FN 1 → P = R = F1 = 1/2; neu: TP 2, FP 1 → P 2/3, R 1, F1 0.8; pos: P 1, R 1/2, F1 2/3.
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["neg"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["neu"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["neu"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["pos"]["recall"] == pytest.approx(0.5) and m["per_class"]["pos"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # equal supports
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert 0.0 <= m["roc_auc"] <= 1.0
    plot_confusion_matrix(m["confusion_matrix"], NAMES, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_binary_roc_auc_by_hand():
    # Positive scores 0.35, 0.8 vs negative 0.1, 0.4: 3 of the 4 (pos, neg) pairs are ordered right.
    p = np.array([0.1, 0.4, 0.35, 0.8])
    logits = np.stack([np.zeros(4), np.log(p / (1 - p))], axis=1)  # softmax → p for class 1
    m = classification_metrics("single_label", np.array([0, 0, 1, 1]), logits, ["no", "yes"])
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.75)  # only 0.35 < 0.5 is wrong


def test_roc_auc_is_left_out_when_a_class_is_absent():
    m = classification_metrics("single_label", np.array([0, 0, 1]), one_hot_logits([0, 1, 1]), NAMES)
    assert "roc_auc" not in m and m["per_class"]["pos"]["support"] == 0


def test_multi_label_metrics_by_hand():
    y_true = np.array([[1, 0], [1, 1], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.7, 0.4], [0.6, 0.1]])  # threshold 0.5 → [1,0], [1,0], [1,0]
    m = classification_metrics("multi_label", y_true, np.log(probs / (1 - probs)), ["a", "b"])
    assert m["subset_accuracy"] == pytest.approx(1 / 3)
    # a: TP 2, FP 1 → F1 0.8; b: TP 0 → F1 0. micro: TP 2, FP 1, FN 1 → 2/3.
    assert m["macro_f1"] == pytest.approx(0.4) and m["micro_f1"] == pytest.approx(2 / 3)
    m_low = classification_metrics("multi_label", y_true, np.log(probs / (1 - probs)), ["a", "b"], threshold=0.35)
    assert m_low["per_class"]["b"]["recall"] == pytest.approx(1.0)


def test_regression_metrics_by_hand():
    m = classification_metrics("regression", np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [2.0], [5.0]]), ["y"])
    assert m["mse"] == pytest.approx(4 / 3) and m["mae"] == pytest.approx(2 / 3)
    assert m["r2"] == pytest.approx(1 - 4 / 2)  # SS_res 4, SS_tot 2

"""Classification losses against values worked out by hand."""

import math

import pytest
import torch

from tunelab.losses.classification import classification_loss, multi_label_loss, regression_loss, single_label_loss


def test_cross_entropy_by_hand():
    # Row 1: logits (0, ln 3) → p(class 1) = 3/4. Row 2: logits (ln 2, 0) → p(class 0) = 2/3.
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]])
    labels = torch.tensor([1, 1])  # row 2 is wrong: p(class 1) = 1/3
    loss, metrics = single_label_loss(logits, labels, normalizer=2)
    assert loss.item() == pytest.approx((-math.log(3 / 4) - math.log(1 / 3)) / 2, abs=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(0.5)


def test_class_weights_scale_each_example_without_renormalizing():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]])
    labels = torch.tensor([1, 0])
    weights = torch.tensor([3.0, 0.5])
    loss, _ = single_label_loss(logits, labels, normalizer=4, class_weights=weights)
    expected = (0.5 * -math.log(3 / 4) + 3.0 * -math.log(2 / 3)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_micro_batches_add_up_to_the_full_batch():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 4, generator=gen), torch.randint(0, 4, (6,), generator=gen)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5])
    full, _ = single_label_loss(logits, labels, 6, weights)
    parts = sum(single_label_loss(logits[i : i + 2], labels[i : i + 2], 6, weights)[0] for i in range(0, 6, 2))
    assert torch.allclose(full, parts, atol=1e-6)


def test_multi_label_bce_by_hand():
    # σ(0) = 1/2 for every entry; σ(ln 3) = 3/4.
    logits = torch.tensor([[0.0, math.log(3.0)]])
    targets = torch.tensor([[1.0, 0.0]])
    loss, metrics = multi_label_loss(logits, targets, normalizer=1)
    assert loss.item() == pytest.approx((-math.log(0.5) - math.log(1 / 4)) / 2, abs=1e-6)
    assert metrics["label_accuracy"].item() == pytest.approx(0.0)  # 0 is not > 0; ln 3 > 0 but target 0
    weighted, _ = multi_label_loss(logits, targets, normalizer=1, pos_weight=torch.tensor([4.0, 4.0]))
    assert weighted.item() == pytest.approx((-4 * math.log(0.5) - math.log(1 / 4)) / 2, abs=1e-6)


def test_regression_mse_by_hand():
    preds, targets = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    loss, metrics = regression_loss(preds, targets, normalizer=2)
    assert loss.item() == pytest.approx(((1 + 4) / 2 + 9 / 2) / 2)
    assert metrics["mae"].item() == pytest.approx(((1 + 2) / 2 + 3 / 2) / 2)


def test_dispatch_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown problem_type"):
        classification_loss("ranking", torch.zeros(1, 2), torch.zeros(1), 1)
    with pytest.raises(ValueError, match="regression"):
        classification_loss("regression", torch.zeros(1, 1), torch.zeros(1, 1), 1, torch.ones(1))

"""LP-FT head initialization: the probed head reproduces scikit-learn's fitted linear model."""

import numpy as np
import pytest
import torch

from tunelab.models.heads import sequence_logits
from tunelab.models.linear_probe import _full_rows, fit_linear_probe, head_features, head_linear, init_head_by_probe
from tests.unit.classification.helpers import tiny_classifier


def batches(num_labels=3, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 16):
        ids = torch.randint(3, 120, (16, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[::3, 7:] = 0  # some padding
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.arange(start, start + 16) % num_labels})
    return out


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_probed_head_reproduces_the_fitted_model(kind):
    from sklearn.linear_model import LogisticRegression

    model = tiny_classifier(kind)
    head = "classifier" if kind == "encoder" else "score"
    plan = batches()
    summary = init_head_by_probe(model, [head], plan, torch.device("cpu"), "single_label", 3, None)
    features = head_features(model, head_linear(model, [head]), plan, torch.device("cpu"))
    targets = torch.cat([b["labels"] for b in plan]).numpy()
    assert summary["examples"] == 48 and features.shape == (48, 32)
    # the same fit done by hand on std-scaled features, with the C cross-validation chose
    scale = features.std(axis=0)
    ref = LogisticRegression(C=summary["C"], fit_intercept=kind == "encoder", max_iter=3000).fit(features / scale, targets)
    with torch.no_grad():
        logits = torch.cat([sequence_logits(model, b) for b in plan]).double().numpy()
    expected = ref.decision_function(features / scale)
    np.testing.assert_allclose(logits, expected, atol=1e-3)
    assert (logits.argmax(1) == ref.predict(features / scale)).all()


def test_binary_fit_becomes_two_softmax_rows():
    coef, bias = np.array([[2.0, -1.0]]), np.array([0.5])
    full_coef, full_bias = _full_rows(coef, bias, np.array([0, 1]), 2)
    x = np.array([0.3, 0.7])
    logits = full_coef @ x + full_bias
    p1 = np.exp(logits[1]) / np.exp(logits).sum()
    assert p1 == pytest.approx(1 / (1 + np.exp(-(coef[0] @ x + bias[0]))))


def test_class_weights_and_regression_and_multi_label_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = (x[:, 0] > 0.8).astype(int)  # rare positive class
    w_plain, _, _ = fit_linear_probe(x, y, "single_label", num_labels=2, class_weight=None, fit_intercept=True)
    w_bal, b_bal, _ = fit_linear_probe(x, y, "single_label", num_labels=2,
                                       class_weight=torch.tensor([0.6, 3.0]), fit_intercept=True)
    recall = lambda w, b: ((x @ w.T + b).argmax(1)[y == 1] == 1).mean()
    assert recall(w_bal, b_bal) >= recall(w_plain, np.zeros(2))
    targets = x[:, :2] @ np.array([[1.5, 0.0], [0.0, -2.0]]) + 0.5
    w, b, summary = fit_linear_probe(x, targets, "regression", num_labels=2, class_weight=None, fit_intercept=True)
    assert summary["train_r2"] > 0.95 and w.shape == (2, 4) and b.shape == (2,)
    multi = np.stack([(x[:, 0] > 0).astype(float), np.ones(60)], axis=1)  # second label always on
    w, b, _ = fit_linear_probe(x, multi, "multi_label", num_labels=2, class_weight=None, fit_intercept=True)
    assert (w[1] == 0).all() and b[1] > 0 and ((x @ w[0] + b[0] > 0) == (multi[:, 0] > 0)).mean() > 0.9


def test_a_class_with_one_example_is_a_clear_error():
    from tunelab.errors import ConfigError

    x, y = np.random.default_rng(0).normal(size=(5, 3)), np.array([0, 0, 0, 0, 1])
    with pytest.raises(ConfigError, match="linear_probe needs >= 2"):
        fit_linear_probe(x, y, "single_label", num_labels=2, class_weight=None, fit_intercept=True)


def test_pairwise_probe_learns_a_planted_preference_direction():
    from tunelab.models.linear_probe import fit_pairwise_probe

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 5)), rng.normal(size=(80, 5))
    better_a = a[:, 2] > b[:, 2]  # the preferred sequence is the one with the larger feature 2
    chosen, rejected = np.where(better_a[:, None], a, b), np.where(better_a[:, None], b, a)
    weight, summary = fit_pairwise_probe(chosen * 10.0, rejected * 10.0)  # scale must not matter
    assert weight.shape == (1, 5) and np.argmax(np.abs(weight[0])) == 2 and weight[0, 2] > 0
    assert summary["train_pairwise_accuracy"] > 0.95


def test_reward_head_probe_sets_scores_that_rank_training_pairs():
    from tunelab.models.linear_probe import init_reward_head_by_probe
    from tunelab.models.logps import reward_scores

    model = tiny_classifier("decoder", num_labels=1)
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, 120, (int(n),), generator=g).tolist() for n in torch.randint(4, 12, (24,), generator=g)]
    chosen, rejected = list(range(0, 24, 2)), list(range(1, 24, 2))
    pairs = [(sequences[c], sequences[r]) for c, r in zip(chosen, rejected)]
    summary = init_reward_head_by_probe(model, ["score"], pairs, 0, torch.device("cpu"), batch_size=5)
    assert summary["pairs"] == 12 and summary["sequences"] == 24
    with torch.no_grad():
        scores = torch.cat([reward_scores(model, {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s))})
                            for s in sequences])
    accuracy = (scores[chosen] > scores[rejected]).float().mean().item()
    assert accuracy == pytest.approx(summary["train_pairwise_accuracy"])


def test_pairwise_probe_cv_by_sequence_does_not_reward_memorizing():
    """Each of 30 sequences has a hidden score that its features do not predict, but 40 random
    features can memorize it. Per-pair folds validate on sequences seen in training and reward that
    memorization (weak regularization); folds over sequences see no signal and regularize most."""
    from tunelab.models.linear_probe import PROBE_CS, fit_pairwise_probe

    rng = np.random.default_rng(0)
    features, hidden = rng.normal(size=(30, 40)), rng.normal(size=30)
    a, b = np.triu_indices(30, k=1)
    chosen = np.where(hidden[a] > hidden[b], a, b)
    rejected = np.where(hidden[a] > hidden[b], b, a)
    _, per_pair = fit_pairwise_probe(features[chosen], features[rejected])
    _, by_sequence = fit_pairwise_probe(features[chosen], features[rejected], chosen, rejected)
    assert by_sequence["C"] == min(PROBE_CS)
    assert per_pair["C"] > min(PROBE_CS) and per_pair["cv_log_loss"] < by_sequence["cv_log_loss"]


def test_loading_a_base_as_classifier_has_no_transformers_load_report(tmp_path):
    """The new head's 'missing' weights are expected: transformers' report is dropped, nothing else is."""
    import logging
    import warnings

    from transformers import AutoModelForSequenceClassification

    from tunelab.models.loading import load_model, load_tokenizer
    from tests.unit.classification.helpers import tiny_base_dir

    class Keep(logging.Handler):
        records = []

        def emit(self, record):
            self.records.append(record.getMessage())

    base = tiny_base_dir("encoder", tmp_path / "enc", load_tokenizer("all-minilm-l6-v2"))
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    handler = Keep()
    transformers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = load_model(str(base), AutoModelForSequenceClassification, num_labels=3,
                                     output_loading_info=True)
        AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=3)  # control: transformers reports
    finally:
        transformers_logger.removeHandler(handler)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    reports = [m for m in handler.records if "LOAD REPORT" in m]
    assert len(reports) == 1  # only the control load's
    assert not [w for w in caught if "newly initialized" in str(w.message)]
    assert logging.getLogger("transformers.modeling_utils").filters == []

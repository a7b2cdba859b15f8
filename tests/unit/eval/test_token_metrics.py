"""Issue 14 rule 4: held-out metrics beyond loss (token accuracy, recipe hooks) are reduced batch by batch
to integer predictions or counts; no full-vocabulary logits are handed out or kept."""

import pytest
import torch

from tunelab.data.collate import pad_collate, packed_collate
from tunelab.eval.perplexity import evaluate_lm
from tests.conftest import make_tiny_llama

EXAMPLES = [([1, 5, 9, 14, 3, 2], [-100, -100, 9, 14, 3, 2]), ([1, 40, 41, 2], [-100, -100, 41, 2]),
            ([1, 7, 8, 9, 10, 11, 12, 2], [-100, -100, -100, 9, 10, 11, 12, 2]), ([1, 30, 2], [-100, 30, 2])]


def _naive_accuracy(model, examples):
    correct = total = 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != -100
            correct += int((logits.argmax(-1)[keep] == target[keep]).sum())
            total += int(keep.sum())
    return correct / total, total


def _half_right(model):
    """EXAMPLES with every other supervised label replaced by the model's own argmax, so the accuracy is
    known to be well inside (0, 1) for a random model."""
    out = []
    with torch.no_grad():
        for ids, labels in EXAMPLES:
            pred = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
            out.append((ids, [lab if lab == -100 or t % 2 else pred[t - 1] for t, lab in enumerate(labels)]))
    return out


class CountingHook:
    """A recipe metric: per-batch integer counts only (here: correct predictions of the end token 2)."""

    def __init__(self):
        self.seen, self.eos_total, self.eos_correct = [], 0, 0

    def update(self, predictions, targets, batch):
        self.seen.append((predictions.dtype, predictions.shape, targets.dtype, targets.shape))
        is_eos = targets == 2
        self.eos_total += int(is_eos.sum())
        self.eos_correct += int((predictions[is_eos] == 2).sum())

    def compute(self):
        return {"eos_accuracy": self.eos_correct / max(self.eos_total, 1), "eos_tokens": self.eos_total}


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("packed", [True, False])
def test_token_accuracy_and_a_recipe_hook_from_integer_predictions(chunked, packed):
    model = make_tiny_llama(vocab_size=50)
    examples = _half_right(model)
    expected, total = _naive_accuracy(model, examples)
    collate = (lambda exs: packed_collate([exs], 0)) if packed else (lambda exs: pad_collate(exs, 0))
    batches = [collate(examples[:2]), collate(examples[2:])]
    hook = CountingHook()
    result = evaluate_lm(model, batches, torch.device("cpu"), precision="fp32", chunked=chunked, chunk_size=16,
                         metrics=[hook])
    assert result["tokens"] == total
    assert result["token_accuracy"] == pytest.approx(expected)
    assert 0 < expected < 1
    assert result["eos_tokens"] == sum(labels.count(2) for _, labels in examples)
    assert len(hook.seen) == 2  # called once per batch
    for p_dtype, p_shape, t_dtype, t_shape in hook.seen:
        assert p_dtype == t_dtype == torch.int64 and len(p_shape) == 1 and p_shape == t_shape  # (N,), no vocab dim
    assert sum(s[1][0] for s in hook.seen) == total

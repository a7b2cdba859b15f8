"""Issue 14 rule 3: label smoothing in the causal-LM loss (chunked and full-logit paths), normalised by the
global supervised-token count, so gradient accumulation and packing leave it unchanged."""

import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.collate import pad_collate, packed_collate
from tunelab.losses.causal_lm import causal_lm_loss, causal_lm_loss_from_logits
from tunelab.models.causal_lm import lm_loss
from tests.conftest import make_tiny_llama

LN2 = math.log(2.0)


def _hand_case():
    """V=3, H=2: both supervised positions have logits [ln 2, 0, 0]; targets 0 then 1."""
    weight = torch.tensor([[LN2, 0.0], [0.0, 0.0], [0.0, 0.0]])
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 0, 1]])  # position t predicts labels[t + 1]; the last predicts nothing
    return hidden, weight, labels


@pytest.mark.parametrize("chunked", [True, False])
def test_smoothed_loss_equals_the_hand_derived_value(chunked):
    # lse = ln 4. Token 1 (target 0): NLL = ln 4 - ln 2 = ln 2; token 2 (target 1): NLL = ln 4 = 2 ln 2.
    # Uniform term for both: lse - mean(z) = 2 ln 2 - ln2/3 = (5/3) ln 2.
    # eps = 0.3: 0.7 ln2 + 0.3 (5/3) ln2 = 1.2 ln2  and  0.7 (2 ln2) + 0.5 ln2 = 1.9 ln2; sum 3.1 ln 2.
    # Normalised by 4 supervised tokens in the whole step (2 of them in another micro-batch).
    hidden, weight, labels = _hand_case()
    loss, metrics = causal_lm_loss(hidden, weight, labels, 4, label_smoothing=0.3, chunked=chunked, chunk_size=1)
    assert float(loss) == pytest.approx(3.1 * LN2 / 4, abs=1e-6)
    assert float(metrics["nll_sum"]) == pytest.approx(3 * LN2, abs=1e-6)  # the plain NLL, for perplexity
    assert int(metrics["num_correct"]) == 1  # argmax is token 0 at both positions
    plain, _ = causal_lm_loss(hidden, weight, labels, 4, chunked=chunked)
    assert float(plain) == pytest.approx(3 * LN2 / 4, abs=1e-6)


def test_chunked_value_and_gradients_equal_pytorch_label_smoothing():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = -100
    loss, _ = causal_lm_loss(hidden, weight, labels, 9, bias=bias, label_smoothing=0.2, chunk_size=3)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    logits = hidden @ weight.T + bias
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), label_smoothing=0.2,
                          reduction="sum") / 9
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias))
    assert torch.allclose(loss, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5)
    from_logits, _ = causal_lm_loss_from_logits(logits, labels, 9, label_smoothing=0.2)
    assert torch.allclose(from_logits, ref, atol=1e-5)


EXAMPLES = [([1, 5, 9, 14, 3, 2], [-100, -100, 9, 14, 3, 2]), ([1, 40, 41, 2], [-100, -100, 41, 2]),
            ([1, 7, 8, 9, 10, 11, 12, 2], [-100, -100, -100, 9, 10, 11, 12, 2]), ([1, 30, 2], [-100, 30, 2])]


def _step(micro_batches, chunked):
    model = make_tiny_llama()
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    total = 0.0
    for batch in micro_batches:
        loss, _ = lm_loss(model, batch, n, chunked=chunked, label_smoothing=0.1)
        loss.backward()
        total += float(loss.detach())
    return total, {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("chunked", [True, False])
def test_accumulation_and_packing_leave_the_smoothed_loss_and_gradients_unchanged(chunked):
    one, g_one = _step([pad_collate(EXAMPLES, 0)], chunked)
    for micro in ([pad_collate([e], 0) for e in EXAMPLES],  # 4 micro-batches of 1
                  [packed_collate([EXAMPLES[:2]], 0), packed_collate([EXAMPLES[2:]], 0)]):  # 2 packed rows
        total, grads = _step(micro, chunked)
        assert total == pytest.approx(one, abs=1e-5)
        for name, g in g_one.items():
            assert torch.allclose(grads[name], g, atol=1e-5), name


def test_label_smoothing_is_a_config_error_outside_sft():
    from tunelab.config.load import validate_config
    from tunelab.errors import ConfigError

    base = {"model": {"name_or_path": "x"}, "data": {"train": {"path": "x"}}, "train": {"label_smoothing": 0.1}}
    assert validate_config(base).train.label_smoothing == 0.1
    with pytest.raises(ConfigError, match="train.label_smoothing applies to the next-token loss of task=sft"):
        validate_config({**base, "task": "reward"})

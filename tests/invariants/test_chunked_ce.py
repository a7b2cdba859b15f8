"""Chunked linear cross-entropy ≡ naive full-logits cross-entropy, in value and gradients."""

import torch
import torch.nn.functional as F

from tunelab.losses.causal_lm import causal_lm_loss, causal_lm_loss_from_logits
from tunelab.models.causal_lm import lm_loss
from tests.conftest import make_tiny_llama


def naive(hidden, weight, labels, normalizer):
    logits = hidden @ weight.t()
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum") / normalizer


def test_value_and_gradients_match_naive():
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100
    labels[2, 7:] = -100
    loss, metrics = causal_lm_loss(hidden, weight, labels, normalizer=17, chunk_size=5)
    expected = naive(hidden, weight, labels, 17)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert int(metrics["num_tokens"]) == int((labels[:, 1:] != -100).sum())
    g = torch.autograd.grad(loss, [hidden, weight])
    g_ref = torch.autograd.grad(expected, [hidden, weight])
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_from_logits_matches_hand_value():
    # one supervised target: logits [0, ln 3] over 2 classes, target 1 → CE = ln(1+3) - ln 3
    logits = torch.tensor([[[0.0, torch.log(torch.tensor(3.0))], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1]])
    loss, _ = causal_lm_loss_from_logits(logits, labels, normalizer=1)
    assert abs(float(loss) - (torch.log(torch.tensor(4.0)) - torch.log(torch.tensor(3.0))).item()) < 1e-6


def test_tied_embeddings_full_model_gradients_match_naive_path():
    model = make_tiny_llama(tie=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = {"input_ids": torch.randint(3, 97, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.bool)}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :5] = -100
    grads = []
    for chunked in (True, False):
        model.zero_grad()
        loss, _ = lm_loss(model, batch, 14, chunked=chunked, chunk_size=4)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name

"""Hand-checked tests for tunelab.losses.logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.losses.logprobs import entropy_from_logits, sequence_logps, token_logps

LN2 = math.log(2.0)


def _tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """B=2, T=3, V=3 logits with hand-known softmaxes, and labels."""
    logits = torch.tensor(
        [
            # row 0: pos 0 -> probs [1/4, 1/2, 1/4]; pos 1 -> uniform 1/3;
            # pos 2 is never used (nothing follows the last token).
            [[0.0, LN2, 0.0], [0.0, 0.0, 0.0], [9.0, -9.0, 4.0]],
            # row 1: pos 0 is masked (label -100); pos 1 logits [1, 2, 3].
            [[5.0, -3.0, 10.0], [1.0, 2.0, 3.0], [0.0, 7.0, 0.0]],
        ]
    )
    labels = torch.tensor(
        [
            [2, 1, 2],  # labels[:, 0] is never predicted (causal shift)
            [-100, -100, 0],
        ]
    )
    return logits, labels


def _expected_logps() -> list[list[float]]:
    # row 0, t=0: p(label 1 | [0, ln2, 0]) = 2 / (1 + 2 + 1) = 1/2
    # row 0, t=1: p(label 2 | [0, 0, 0]) = 1/3
    # row 1, t=0: masked -> exactly 0
    # row 1, t=1: p(label 0 | [1, 2, 3]) = e^1 / (e^1 + e^2 + e^3)
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    return [[math.log(0.5), math.log(1 / 3)], [0.0, 1.0 - lse]]


def test_token_logps_values_shift_and_mask() -> None:
    logits, labels = _tiny_batch()
    logps, mask = token_logps(logits, labels)
    assert logps.shape == (2, 2) and mask.shape == (2, 2)
    assert logps.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.tolist() == [[True, True], [False, True]]
    torch.testing.assert_close(logps, torch.tensor(_expected_logps()), rtol=0, atol=1e-6)
    assert logps[1, 0].item() == 0.0  # masked entries are exactly zero


def test_token_logps_gradient_is_onehot_minus_softmax() -> None:
    logits, labels = _tiny_batch()
    logits.requires_grad_(True)
    logps, _ = token_logps(logits, labels)
    logps.sum().backward()
    grad = logits.grad
    # d log softmax(z)_k / dz = onehot(k) - softmax(z)
    # row 0, t=0, label 1, probs [1/4, 1/2, 1/4] -> [-1/4, 1/2, -1/4]
    torch.testing.assert_close(grad[0, 0], torch.tensor([-0.25, 0.5, -0.25]))
    # row 0, t=1, label 2, uniform -> [-1/3, -1/3, 2/3]
    torch.testing.assert_close(grad[0, 1], torch.tensor([-1 / 3, -1 / 3, 2 / 3]))
    # row 1, t=1, label 0: [1 - p0, -p1, -p2] with p = softmax([1, 2, 3])
    z = sum(math.exp(v) for v in (1, 2, 3))
    p = [math.exp(v) / z for v in (1, 2, 3)]
    torch.testing.assert_close(grad[1, 1], torch.tensor([1 - p[0], -p[1], -p[2]]))
    # masked position and the last position (no next token) get no gradient
    assert torch.all(grad[1, 0] == 0) and torch.all(grad[:, 2] == 0)


def test_token_logps_bf16_logits_return_float32() -> None:
    logits, labels = _tiny_batch()
    logps, mask = token_logps(logits.to(torch.bfloat16), labels)
    assert logps.dtype == torch.float32
    assert mask.tolist() == [[True, True], [False, True]]
    # bf16 rounding of ln2 etc. only, so a loose tolerance
    torch.testing.assert_close(logps, torch.tensor(_expected_logps()), rtol=0, atol=2e-2)


def test_token_logps_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        token_logps(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_sequence_logps_sums_masked_tokens() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("-inf"), -4.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    seq, num_tokens = sequence_logps(logps, mask)
    # row 0: -1 + -2 = -3 (the -3 is masked); row 1: -0.5 + -4 = -4.5 (the -inf is masked)
    torch.testing.assert_close(seq, torch.tensor([-3.0, -4.5]))
    assert num_tokens.dtype == torch.long and num_tokens.tolist() == [2, 2]
    seq.sum().backward()
    assert logps.grad.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


def test_sequence_logps_all_masked_row_is_zero() -> None:
    seq, n = sequence_logps(torch.tensor([[-1.0, -2.0]]), torch.tensor([[False, False]]))
    assert seq.tolist() == [0.0] and n.tolist() == [0]


def test_entropy_from_logits_values() -> None:
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0],  # uniform over 3 -> ln 3
            [0.0, LN2, 0.0],  # [1/4,1/2,1/4] -> 2*(1/4)ln4 + (1/2)ln2 = 1.5 ln2
            [0.0, 0.0, float("-inf")],  # banned token -> uniform over 2 -> ln2
        ]
    )
    ent = entropy_from_logits(logits)
    expected = torch.tensor([math.log(3.0), 1.5 * LN2, LN2])
    torch.testing.assert_close(ent, expected, rtol=0, atol=1e-6)


def test_entropy_from_logits_gradient_and_dtype() -> None:
    # H(z) for z = [a, 0]: p = sigmoid(a); dH/da = -a * p * (1 - p)
    a = 0.7
    logits = torch.tensor([[a, 0.0, float("-inf")]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    p = 1 / (1 + math.exp(-a))
    assert logits.grad[0, 0].item() == pytest.approx(-a * p * (1 - p), abs=1e-6)
    assert torch.isfinite(logits.grad).all()
    half = entropy_from_logits(torch.zeros(4, 5, dtype=torch.bfloat16))
    assert half.dtype == torch.float32 and half.shape == (4,)
    torch.testing.assert_close(half, torch.full((4,), math.log(5.0)))

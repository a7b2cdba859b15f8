"""Packed rows (position_ids restarting, no attention mask) ≡ separate sequences, for sdpa and eager.

transformers only builds the block-diagonal mask when no KV cache is passed, so every packed
forward runs with ``use_cache=False`` (as :func:`tunelab.models.causal_lm.lm_loss` does).
"""

import pytest
import torch

from tunelab.data.collate import pad_collate, packed_collate
from tunelab.models.attention import register as register_sdpa_varlen
from tunelab.models.causal_lm import lm_loss
from tests.conftest import make_tiny_llama

register_sdpa_varlen()

EXAMPLES = [([1, 5, 9, 14, 3, 2], [-100, -100, 9, 14, 3, 2]), ([1, 40, 41, 2], [-100, -100, 41, 2]),
            ([1, 7, 8, 9, 10, 11, 12, 2], [-100, -100, -100, 9, 10, 11, 12, 2])]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_varlen"])
def test_packed_logits_and_loss_equal_unpacked(attn):
    model = make_tiny_llama()
    model.config._attn_implementation = attn
    packed = packed_collate([EXAMPLES], pad_token_id=0)
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for ids, _ in EXAMPLES:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert torch.allclose(packed_logits[start : start + len(ids)], alone, atol=1e-5)
            start += len(ids)
        padded = pad_collate(EXAMPLES, pad_token_id=0)
        n = sum(sum(1 for x in labs[1:] if x != -100) for _, labs in EXAMPLES)
        loss_packed, _ = lm_loss(model, packed, n)
        loss_padded, _ = lm_loss(model, padded, n)
    assert torch.allclose(loss_packed, loss_padded, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_varlen"])
def test_padded_tail_segment_does_not_change_real_tokens(attn):
    model = make_tiny_llama()
    model.config._attn_implementation = attn
    rows = [[EXAMPLES[0], EXAMPLES[1]], [EXAMPLES[2]]]
    batch = packed_collate(rows, pad_token_id=0)
    with torch.no_grad():
        both = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([EXAMPLES[2][0]])).logits
    assert torch.allclose(both[1, : len(EXAMPLES[2][0])], alone[0], atol=1e-5)


def test_flattened_rows_with_sdpa_varlen_equal_padded_rows_with_sdpa():
    """sft_batch_plan(flatten_rows=True): a micro-batch's packed rows become one row; with sdpa_varlen
    the loss and gradients equal the padded multi-row batch under transformers' masked sdpa."""
    from tunelab.data.batching import sft_batch_plan
    from tunelab.data.tokenize import TokenizedExample

    exs = [TokenizedExample(ids, labs) for ids, labs in EXAMPLES * 3]
    results = {}
    for attn, flatten in (("sdpa", False), ("sdpa_varlen", True)):
        plan = sft_batch_plan(exs, batch_size=3, max_seq_len=12, packing=True, shuffle=False, seed=0,
                              pad_token_id=0, flatten_rows=flatten)
        batches = plan.make_epoch(0)
        model = make_tiny_llama()
        model.config._attn_implementation = attn
        total = sum(b["num_supervised"] for b in batches)
        loss = sum(lm_loss(model, b, total)[0] for b in batches)
        loss.backward()
        results[flatten] = (batches, float(loss.detach()), {n: p.grad for n, p in model.named_parameters()})
    padded, flat = results[False][0], results[True][0]
    assert all(b["input_ids"].shape[0] == 1 for b in flat) and any(b["input_ids"].shape[0] > 1 for b in padded)
    assert sum(b["input_ids"].numel() for b in flat) < sum(b["input_ids"].numel() for b in padded)  # no padding
    assert abs(results[False][1] - results[True][1]) < 1e-5
    for name, grad in results[False][2].items():
        assert torch.allclose(grad, results[True][2][name], atol=1e-5), name

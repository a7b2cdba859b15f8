"""Packed rows (position_ids restarting, no attention mask) ≡ separate sequences, for sdpa and eager.

transformers only builds the block-diagonal mask when no KV cache is passed, so every packed
forward runs with ``use_cache=False`` (as :func:`tunelab.models.causal_lm.lm_loss` does).
"""

import pytest
import torch

from tunelab.data.collate import pad_collate, packed_collate
from tunelab.models.causal_lm import lm_loss
from tests.conftest import make_tiny_llama

EXAMPLES = [([1, 5, 9, 14, 3, 2], [-100, -100, 9, 14, 3, 2]), ([1, 40, 41, 2], [-100, -100, 41, 2]),
            ([1, 7, 8, 9, 10, 11, 12, 2], [-100, -100, -100, 9, 10, 11, 12, 2])]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
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


def test_padded_tail_segment_does_not_change_real_tokens():
    model = make_tiny_llama()
    rows = [[EXAMPLES[0], EXAMPLES[1]], [EXAMPLES[2]]]
    batch = packed_collate(rows, pad_token_id=0)
    with torch.no_grad():
        both = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([EXAMPLES[2][0]])).logits
    assert torch.allclose(both[1, : len(EXAMPLES[2][0])], alone[0], atol=1e-5)

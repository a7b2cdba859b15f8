"""sdpa_varlen: per-example causal attention for packed rows equals transformers' masked sdpa."""

import pytest
import torch

from tunelab.data.collate import packed_collate
from tunelab.models.attention import register, resolve_attn_implementation, segment_bounds
from tunelab.models.causal_lm import lm_loss
from tests.conftest import make_tiny_llama

register()

EXAMPLES = [([1, 5, 9, 14, 3, 2], [-100, -100, 9, 14, 3, 2]), ([1, 40, 41, 2], [-100, -100, 41, 2]),
            ([1, 7, 8, 9, 10, 11, 12, 2], [-100, -100, -100, 9, 10, 11, 12, 2])]


def test_segment_bounds_split_where_positions_restart():
    assert segment_bounds(torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])) == [0, 3, 5, 9]
    assert segment_bounds(torch.tensor([0, 1, 2])) == [0, 3]
    assert segment_bounds(torch.tensor([4, 5, 0, 1])) == [0, 2, 4]  # a row that starts mid-sequence


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_loss_and_gradients_equal_masked_sdpa():
    batch = packed_collate([EXAMPLES], pad_token_id=0)
    n = sum(sum(1 for x in labs[1:] if x != -100) for _, labs in EXAMPLES)
    results = {}
    for attn in ("sdpa", "sdpa_varlen"):
        model = make_tiny_llama()
        model.config._attn_implementation = attn
        loss, _ = lm_loss(model, batch, n)
        loss.backward()
        results[attn] = (loss.detach(), _grads(model))
    (loss_a, grads_a), (loss_b, grads_b) = results["sdpa"], results["sdpa_varlen"]
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


def test_padded_batch_and_generation_fall_back_to_sdpa():
    """Left-padded input carries a padding mask (fallback path); cached decoding has query < key."""
    longest = max(len(ids) for ids, _ in EXAMPLES)
    input_ids = torch.tensor([[0] * (longest - len(ids)) + ids for ids, _ in EXAMPLES])
    padded = {"input_ids": input_ids, "attention_mask": (torch.arange(longest) >= torch.tensor(
        [[longest - len(ids)] for ids, _ in EXAMPLES])).long()}
    outputs = {}
    for attn in ("sdpa", "sdpa_varlen"):
        model = make_tiny_llama()
        model.config._attn_implementation = attn
        with torch.no_grad():
            logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            generated = model.generate(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                       max_new_tokens=4, do_sample=False, pad_token_id=0)
        outputs[attn] = (logits, generated)
    real = padded["attention_mask"].bool()
    assert torch.allclose(outputs["sdpa"][0][real], outputs["sdpa_varlen"][0][real], atol=1e-5)
    assert torch.equal(outputs["sdpa"][1], outputs["sdpa_varlen"][1])


def test_unpacked_batch_without_mask_uses_one_causal_call():
    ids = torch.tensor([[1, 5, 9, 14], [1, 40, 41, 2]])
    outs = []
    for attn in ("sdpa", "sdpa_varlen"):
        model = make_tiny_llama()
        model.config._attn_implementation = attn
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_auto_picks_sdpa_varlen_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attn_implementation("auto") == "sdpa_varlen"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_attn_implementation("auto") == "sdpa"
    assert resolve_attn_implementation("eager") == "eager"


@pytest.mark.parametrize("attn", ["sdpa_varlen"])
def test_saved_config_loads_without_tunelab_attention(tmp_path, attn):
    """A model trained with sdpa_varlen saves a config plain transformers can load."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama()
    model.config._attn_implementation = attn
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "sdpa_varlen" not in text
    AutoModelForCausalLM.from_pretrained(tmp_path)


def test_segment_attention_equals_explicit_block_causal_softmax():
    """Reference written out: softmax(q kᵀ/√D + mask) v with mask = same example and key ≤ query."""
    from tunelab.models.attention import segment_causal_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = segment_causal_attention(module, q, k, v, None, position_ids=position_ids)
    example = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    allowed = (example[:, None] == example[None, :]) & (torch.arange(9)[None, :] <= torch.arange(9)[:, None])
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2)) / 8 ** 0.5
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vv
    assert out.shape == (1, 9, 4, 8)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)


def test_compiled_path_custom_op_is_consistent_with_its_fake_and_autograd():
    """The op train.compile uses for sdpa_varlen: schema, fake (shape-only) kernel and autograd
    registration checked by torch.library.opcheck, and its gradients equal the eager path's."""
    from tunelab.models.attention import _segment_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 8, generator=gen, requires_grad=True) for _ in range(2))
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    torch.library.opcheck(torch.ops.tunelab.segment_attention, (q, k, v, position_ids, None, True))
    grad_out = torch.randn(1, 9, 4, 8, generator=gen)
    op_grads = torch.autograd.grad(torch.ops.tunelab.segment_attention(q, k, v, position_ids, None, True),
                                   (q, k, v), grad_out)
    eager_grads = torch.autograd.grad(_segment_attention(q, k, v, position_ids, 0.0, None, True), (q, k, v), grad_out)
    for a, b in zip(op_grads, eager_grads):
        assert torch.allclose(a, b, atol=1e-6)

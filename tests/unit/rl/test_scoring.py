"""Completion log-probs: equal to a plain full forward, padding-invariant, reference = adapters off."""

import torch

from tunelab.adapters.lora import inject_lora
from tunelab.rollout.prompts import Prompt, collate_prompts
from tunelab.rollout.scoring import reference_logps, score_completions
from tests.conftest import make_tiny_llama


def _batch():
    prompts = [Prompt([], [5, 6, 7, 8], {}), Prompt([], [9, 10], {})]
    prompt_ids, prompt_mask = collate_prompts(prompts, pad_id=0)
    completion_ids = torch.tensor([[11, 12, 2, 0], [13, 14, 15, 16]])
    completion_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    return prompts, prompt_ids, prompt_mask, completion_ids, completion_mask


def _naive(model, prompt, completion, temperature=1.0):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0] / temperature, dim=-1)
    return [float(logps[len(prompt) - 1 + t, tok]) for t, tok in enumerate(completion)]


def test_logps_match_an_unpadded_forward_per_row_and_are_zero_at_padding():
    model = make_tiny_llama()
    prompts, *args = _batch()
    scored = score_completions(model, *args, temperature=0.7)
    for row, n in ((0, 3), (1, 4)):
        expected = _naive(model, prompts[row].input_ids, args[2][row, :n].tolist(), temperature=0.7)
        assert torch.allclose(scored.logps[row, :n], torch.tensor(expected), atol=1e-5)
    assert scored.logps[0, 3] == 0
    assert (scored.entropy[args[3]] > 0).all()


def test_reference_is_the_model_with_adapters_disabled():
    model = make_tiny_llama()
    _, *args = _batch()
    base = score_completions(model, *args).logps
    inject_lora(model, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    policy = score_completions(model, *args).logps
    ref = reference_logps(model, *args)
    assert torch.allclose(ref, base, atol=1e-6)
    assert not torch.allclose(policy, base, atol=1e-3)  # guard: the adapter really changes the policy


def test_value_head_reads_the_state_before_each_token():
    from tunelab.models.value_head import ValueHead

    model = make_tiny_llama()
    prompts, *args = _batch()
    head = ValueHead(model.config.hidden_size)
    values = score_completions(model, *args, value_head=head).values
    ids = torch.tensor([prompts[1].input_ids + args[2][1].tolist()])
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
    expected = head(hidden[:, len(prompts[1].input_ids) - 1:-1])
    assert values.shape == (2, 4) and torch.allclose(values[1], expected[0], atol=1e-5)


def test_value_head_save_load_roundtrip(tmp_path):
    from tunelab.models.value_head import ValueHead

    head = ValueHead(8)
    head.save(tmp_path)
    loaded = ValueHead.load(tmp_path)
    hidden = torch.randn(2, 3, 8)
    assert torch.equal(head(hidden), loaded(hidden)) and head(hidden).shape == (2, 3)

"""Preference invariants: DPO is ln 2 when policy ≡ reference (dropout on in the model config), the
logged chosen/rejected log-probs are the right replies' summed log-probs, reward scores do not depend
on padding, and packed preference batches equal unpacked ones."""

import math

import pytest
import torch

from tests.conftest import make_tiny_llama
from tunelab.adapters.lora import inject_lora
from tunelab.config.preference import PreferenceConfig
from tunelab.data.preference import (
    PairTokenizer, preference_collate, preference_packed_collate, to_preference_example, tokenize_pairs,
)
from tunelab.models.logps import disable_dropout, make_reference, pair_logps, reward_scores, sequence_logps_of_batch
from tunelab.recipes.dpo import preference_step_loss

VOCAB = 49152
RECORDS = [
    {"prompt": "My printer is offline.", "chosen": "Restart it, then check the cable.", "rejected": "No idea."},
    {"prompt": "How do I copy a file?", "chosen": "Use cp source target.", "rejected": "Files cannot be copied, sorry."},
    {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is RAM?"}],
     "chosen": "Working memory.", "rejected": "RAM stands for a kind of memory used by many devices today."},
]


@pytest.fixture
def pairs(smollm2_tokenizer):
    return tokenize_pairs([to_preference_example(r, {}, "r") for r in RECORDS], PairTokenizer(smollm2_tokenizer, 128))[0]


def dropout_lora_model():
    """Tiny Llama with attention dropout 0.3 in its config and LoRA (dropout 0.2) on every linear."""
    model = make_tiny_llama(vocab_size=VOCAB, dropout=0.3)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.2)
    return model


def test_dpo_is_ln2_at_step_zero_with_zero_rewards(pairs, smollm2_tokenizer):
    torch.manual_seed(0)
    model = dropout_lora_model()
    disable_dropout(model)
    model.train()  # training mode, as inside fit(); the reference switches itself to eval mode
    batch = preference_collate(pairs, smollm2_tokenizer.pad_token_id)
    loss, metrics = preference_step_loss(model, batch, len(pairs), make_reference("adapters_off", model),
                                         PreferenceConfig())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(metrics[key].item()) < 1e-6
    assert metrics["rewards/accuracy"].item() == 0.0
    loss.backward()  # the gradient is not zero at ln 2: DPO pushes chosen up and rejected down
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_without_disabling_dropout_step_zero_is_not_ln2(pairs, smollm2_tokenizer):
    """Control for the test above: train-mode dropout makes the policy differ from the reference."""
    torch.manual_seed(0)
    model = dropout_lora_model()
    model.train()
    batch = preference_collate(pairs, smollm2_tokenizer.pad_token_id)
    loss, _ = preference_step_loss(model, batch, len(pairs), make_reference("adapters_off", model),
                                   PreferenceConfig())
    assert abs(loss.item() - math.log(2)) > 1e-4


@pytest.mark.parametrize("kind", ["frozen_copy", "precomputed"])
def test_full_finetuning_references_also_give_ln2(pairs, smollm2_tokenizer, kind, tmp_path):
    model = make_tiny_llama(vocab_size=VOCAB, dropout=0.3)
    disable_dropout(model)
    batch = preference_collate(pairs, smollm2_tokenizer.pad_token_id)
    reference = make_reference(kind, model, batches=[batch], cache_path=tmp_path / "ref.safetensors")
    model.train()
    loss, _ = preference_step_loss(model, batch, len(pairs), reference, PreferenceConfig())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def summed_reply_logps_by_hand(model, ids, labels):
    """log pi(reply | prompt): one sequence alone, summing log-softmax at each labelled token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100)


def test_logged_chosen_and_rejected_are_the_right_replies(pairs, smollm2_tokenizer):
    model = make_tiny_llama(vocab_size=VOCAB)
    inject_lora(model, "all-linear", r=4, alpha=8)
    for pair in pairs:  # one pair per batch: the logged means are that pair's values
        batch = preference_collate([pair], smollm2_tokenizer.pad_token_id)
        with torch.no_grad():
            _, metrics = preference_step_loss(model, batch, 1, make_reference("adapters_off", model),
                                              PreferenceConfig())
        chosen = summed_reply_logps_by_hand(model, pair.chosen_ids, pair.chosen_labels)
        rejected = summed_reply_logps_by_hand(model, pair.rejected_ids, pair.rejected_labels)
        assert abs(chosen - rejected) > 1.0  # so a swap would be caught
        assert metrics["logps/chosen"].item() == pytest.approx(chosen, abs=1e-3)
        assert metrics["logps/rejected"].item() == pytest.approx(rejected, abs=1e-3)


def test_packed_preference_batch_equals_unpacked(pairs, smollm2_tokenizer):
    model = make_tiny_llama(vocab_size=VOCAB)
    padded = preference_collate(pairs, smollm2_tokenizer.pad_token_id)
    packed = preference_packed_collate([pairs[:2], pairs[2:]], smollm2_tokenizer.pad_token_id)
    with torch.no_grad():
        seq_padded, num_padded = sequence_logps_of_batch(model, padded)
        seq_packed, num_packed = sequence_logps_of_batch(model, packed)
    torch.testing.assert_close(seq_packed, seq_padded, atol=1e-5, rtol=0)
    assert torch.equal(num_packed, num_padded)
    grads = []
    for batch in (padded, packed):  # and the DPO gradients agree too
        model.zero_grad()
        reference = make_reference("frozen_copy", model)
        model.model.layers[0].mlp.up_proj.weight.data += 0.01  # policy ≠ reference, so the loss is not flat
        loss, _ = preference_step_loss(model, batch, len(pairs), reference, PreferenceConfig())
        loss.backward()
        model.model.layers[0].mlp.up_proj.weight.data -= 0.01
        grads.append(model.model.embed_tokens.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_accumulated_micro_batches_equal_one_batch(pairs, smollm2_tokenizer):
    model = make_tiny_llama(vocab_size=VOCAB)
    reference = make_reference("frozen_copy", model)
    model.lm_head.weight.data.mul_(1.1)
    pc = PreferenceConfig(loss="ipo")
    whole, _ = preference_step_loss(model, preference_collate(pairs, 0), 3, reference, pc)
    parts = sum(preference_step_loss(model, preference_collate([p], 0), 3, reference, pc)[0] for p in pairs)
    assert whole.item() == pytest.approx(parts.item(), rel=1e-5)


def tiny_llama_reward_model():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=2)
    return LlamaForSequenceClassification(config).eval()


def tiny_bert_reward_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=1)
    return BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("make_model, tokenizer_name", [(tiny_llama_reward_model, "smollm2-135m-instruct"),
                                                         (tiny_bert_reward_model, "all-minilm-l6-v2")])
def test_reward_scores_identical_under_left_right_and_no_padding(make_model, tokenizer_name):
    from tunelab.models.loading import load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    model = make_model()
    pairs, _ = tokenize_pairs([to_preference_example(r, {}, "r") for r in RECORDS[:2]] + [
        to_preference_example({"prompt": "Hi", "chosen": "Hello there, how can I help you today?", "rejected": "Hi"},
                              {}, "r")], PairTokenizer(tok, 128))
    with torch.no_grad():
        right = reward_scores(model, preference_collate(pairs, tok.pad_token_id, "right"))
        left = reward_scores(model, preference_collate(pairs, tok.pad_token_id, "left"))
        alone = torch.cat([reward_scores(model, preference_collate([p], tok.pad_token_id))
                           for p in pairs]).view(len(pairs), 2).T.reshape(-1)  # [c0, c1, c2, r0, r1, r2]
    assert len(set(len(p.chosen_ids) for p in pairs) | set(len(p.rejected_ids) for p in pairs)) > 3  # real padding
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)


def test_policy_logps_have_gradients_and_reference_does_not(pairs, smollm2_tokenizer):
    model = make_tiny_llama(vocab_size=VOCAB)
    inject_lora(model, "all-linear", r=4, alpha=8)
    batch = preference_collate(pairs, smollm2_tokenizer.pad_token_id)
    assert pair_logps(model, batch).chosen.requires_grad
    assert not make_reference("adapters_off", model)(batch).chosen.requires_grad


@pytest.mark.integration
def test_real_smollm2_ln2_at_step_zero_and_packed_equals_unpacked(pairs, smollm2_tokenizer):
    from tunelab.models.loading import load_model

    model = load_model("smollm2-135m-instruct")
    inject_lora(model, "all-linear", r=8, alpha=16, dropout=0.1)
    disable_dropout(model)
    model.train()
    padded = preference_collate(pairs, smollm2_tokenizer.pad_token_id)
    packed = preference_packed_collate([pairs], smollm2_tokenizer.pad_token_id)
    reference = make_reference("adapters_off", model)
    with torch.no_grad():
        loss, _ = preference_step_loss(model, padded, len(pairs), reference, PreferenceConfig())
        seq_padded, _ = sequence_logps_of_batch(model, padded)
        seq_packed, _ = sequence_logps_of_batch(model, packed)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    torch.testing.assert_close(seq_packed, seq_padded, atol=1e-4, rtol=1e-5)

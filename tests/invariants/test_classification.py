"""Classification invariants: padding-invariant head outputs, save → reload (full, LoRA + head, PEFT)."""

import copy
import json

import pytest
import torch

from tunelab.adapters.lora import inject_lora, lora_layers
from tunelab.data.classification import ClassificationExample, collate_classification
from tunelab.models.heads import sequence_logits
from tunelab.models.run import load_run, save_run
from tests.unit.classification.helpers import tiny_base_dir, tiny_classifier

LENGTHS = (3, 9, 6, 1, 12)


def examples(with_types=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 120, (n,), generator=gen).tolist()
        types = [0] * (n // 2) + [1] * (n - n // 2) if with_types else None
        out.append(ClassificationExample(ids, types, 0))
    return out


def logits_of(model, exs, padding_side, pad_token_id=0):
    with torch.no_grad():
        return sequence_logits(model, collate_classification(exs, pad_token_id, padding_side))


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_equals_one_at_a_time(kind, padding_side):
    model = tiny_classifier(kind)
    exs = examples(with_types=kind == "encoder")
    batched = logits_of(model, exs, padding_side)
    single = torch.cat([logits_of(model, [e], padding_side) for e in exs])
    assert batched.shape == (len(LENGTHS), 3)
    assert torch.allclose(batched, single, atol=1e-5), (batched - single).abs().max()
    # The pad id must not matter either (it is never attended to nor read).
    assert torch.allclose(logits_of(model, exs, padding_side, pad_token_id=77), batched, atol=1e-5)


def test_left_and_right_padding_agree_for_the_decoder():
    model = tiny_classifier("decoder")
    exs = examples()
    assert torch.allclose(logits_of(model, exs, "left"), logits_of(model, exs, "right"), atol=1e-5)


def test_decoder_without_pad_token():
    model = tiny_classifier("decoder", pad_token_id=None)
    assert model.config.pad_token_id is None
    exs = examples()
    batch = collate_classification(exs, pad_token_id=2, padding_side="right")
    with pytest.raises(ValueError):  # transformers' own forward cannot find the last token
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    single = torch.cat([logits_of(model, [e], "right", pad_token_id=2) for e in exs])
    assert torch.allclose(logits_of(model, exs, "right", pad_token_id=2), single, atol=1e-5)


def randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.2
    head = model.score if hasattr(model, "score") else model.classifier
    for p in head.parameters():
        p.data = torch.randn(p.shape, generator=gen)


def head_model_from_base(kind, base_dir, num_labels=3):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=num_labels, id2label={0: "neg", 1: "neu", 2: "pos"},
        label2id={"neg": 0, "neu": 1, "pos": 2})
    model.config.pad_token_id = 0
    return model.eval()


def hf_batch(kind):
    exs = examples(with_types=False, seed=3)
    batch = collate_classification(exs, 0, "right")
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_full_save_reload_reproduces_logits(kind, tmp_path, smollm2_tokenizer):
    from transformers import AutoModelForSequenceClassification

    base = tiny_base_dir(kind, tmp_path / "base", smollm2_tokenizer)
    model = head_model_from_base(kind, base)
    randomize(model)
    batch = hf_batch(kind)
    with torch.no_grad():
        expected = sequence_logits(model, batch)
    save_run(tmp_path / "run", model, smollm2_tokenizer, method="full", base_model=str(base), config_yaml="",
             results={}, task_type="SEQ_CLS")
    reloaded, _, info = load_run(tmp_path / "run", AutoModelForSequenceClassification)
    assert info["task_type"] == "SEQ_CLS"
    assert reloaded.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    with torch.no_grad():
        assert torch.allclose(sequence_logits(reloaded, batch), expected, atol=1e-6)
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-6)  # transformers' own forward


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_lora_and_head_save_reload_in_tunelab_and_peft(kind, tmp_path, smollm2_tokenizer):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    base = tiny_base_dir(kind, tmp_path / "base", smollm2_tokenizer)
    model = head_model_from_base(kind, base)
    head = "score" if kind == "decoder" else "classifier"
    inject_lora(model, "all-linear", r=4, alpha=8, exclude=[head])
    model.get_submodule(head).requires_grad_(True)
    randomize(model)
    batch = hf_batch(kind)
    with torch.no_grad():
        expected = sequence_logits(model, batch)
    save_run(tmp_path / "run", model, smollm2_tokenizer, method="lora", base_model=str(base), config_yaml="",
             results={}, task_type="SEQ_CLS", modules_to_save=[head])
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == [head]

    ours, _, _ = load_run(tmp_path / "run", AutoModelForSequenceClassification, num_labels=3)
    with torch.no_grad():
        assert torch.allclose(sequence_logits(ours, batch), expected, atol=1e-6)

    fresh = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    fresh.config.pad_token_id = 0
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "run").eval()
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    assert not torch.allclose(theirs, head_model_from_base(kind, base)(**batch).logits, atol=1e-3)
    assert torch.allclose(theirs, expected, atol=1e-6), (theirs - expected).abs().max()


def test_lora_without_saved_head_would_not_reproduce(tmp_path, smollm2_tokenizer):
    """Control for the test above: the head really matters (a fresh head gives other logits)."""
    base = tiny_base_dir("decoder", tmp_path / "base", smollm2_tokenizer)
    model = head_model_from_base("decoder", base)
    trained = copy.deepcopy(model)
    randomize(trained)
    batch = hf_batch("decoder")
    with torch.no_grad():
        assert not torch.allclose(sequence_logits(model, batch), sequence_logits(trained, batch), atol=1e-3)

"""Stage chaining (issue 18): ``model.name_or_path`` = an earlier run directory. The chained start has
the earlier run's logits (LoRA merged, recursively; full weights; QLoRA's dequantized base), its tokenizer
and chat template come along, each recipe records the lineage, and checkpoints/unfinished runs are refused.
All of it fails on the old code (which loaded a run directory as a plain transformers folder)."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from tests.conftest import make_tiny_llama
from tunelab.config.load import validate_config
from tunelab.errors import ModelLoadError

IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 2, 7]])
QUIET = Console(quiet=True)


@pytest.fixture
def base_dir(tmp_path, smollm2_tokenizer):
    path = tmp_path / "base"
    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer))
    model.config.pad_token_id = smollm2_tokenizer.pad_token_id
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def save_lora_run(out, model, tokenizer, base, seed=0, quantize=False, lineage=()):
    """Inject a LoRA adapter with a non-zero update into ``model``, save it as a run over ``base``;
    returns the logits of the unmerged in-memory model (what that run computes)."""
    from tunelab.adapters.lora import inject_lora, lora_layers
    from tunelab.models.run import save_run
    from tunelab.recipes.prepare import quantize_base

    if quantize:
        quantize_base(model, "nf4")
    inject_lora(model, "all-linear", r=4, alpha=8)
    torch.manual_seed(seed)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_run(out, model, tokenizer, method="lora", base_model=str(base), config_yaml="task: sft\n",
             results={"steps": 1}, lineage=list(lineage))
    return logits(model)


def test_a_lora_run_loads_merged_with_its_logits_and_a_full_run_over_it_too(tmp_path, base_dir, smollm2_tokenizer):
    from tunelab.adapters.lora import lora_layers
    from tunelab.models.lineage import start_lineage
    from tunelab.models.loading import load_model
    from tunelab.models.run import load_run, load_weights, save_run

    first = save_lora_run(tmp_path / "a", load_model(str(base_dir)), smollm2_tokenizer, base_dir)
    merged = load_weights(str(tmp_path / "a"))
    assert not list(lora_layers(merged))  # a plain model: the adapter is merged
    assert torch.allclose(logits(merged), first, atol=1e-5)
    assert not torch.allclose(logits(load_model(str(base_dir))), first, atol=1e-3)  # the adapter mattered

    # B: a LoRA run over run A (its base is a run directory): loads recursively, merged twice
    lineage_b = start_lineage(str(tmp_path / "a"))
    second = save_lora_run(tmp_path / "b", load_weights(str(tmp_path / "a")), smollm2_tokenizer, tmp_path / "a",
                           seed=1, lineage=lineage_b)
    assert torch.allclose(logits(load_weights(str(tmp_path / "b"))), second, atol=1e-5)
    assert torch.allclose(logits(load_run(tmp_path / "b")[0]), second, atol=1e-5)

    # C: a full fine-tune over B: its own weights
    model_c = load_weights(str(tmp_path / "b"))
    with torch.no_grad():
        model_c.model.norm.weight.mul_(1.5)
    third = logits(model_c)
    save_run(tmp_path / "c", model_c, smollm2_tokenizer, method="full", base_model=str(tmp_path / "b"),
             config_yaml="task: dpo\n", results={"steps": 1}, lineage=start_lineage(str(tmp_path / "b")))
    assert torch.allclose(logits(load_weights(str(tmp_path / "c"))), third, atol=1e-5)

    lineage = start_lineage(str(tmp_path / "c"))
    assert [e["output_dir"] for e in lineage] == [str((tmp_path / n).resolve()) for n in "abc"]
    assert [(e["task"], e["method"]) for e in lineage] == [("sft", "lora"), ("sft", "lora"), ("dpo", "full")]
    assert lineage[1]["base_model"] == str(tmp_path / "a") and all(len(e["weights_sha256"]) == 64 for e in lineage)


def test_a_qlora_run_chains_from_the_dequantized_base_it_trained_against(tmp_path, base_dir, smollm2_tokenizer):
    pytest.importorskip("torchao")
    from tunelab.models.loading import load_model
    from tunelab.models.run import load_weights
    from tunelab.quant.nf4 import NF4Linear

    on_nf4 = save_lora_run(tmp_path / "q", load_model(str(base_dir)), smollm2_tokenizer, base_dir, quantize=True)
    merged = load_weights(str(tmp_path / "q"))
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    assert torch.allclose(logits(merged), on_nf4, atol=1e-5)  # not the full-precision base + adapter


def test_a_changed_base_run_is_refused_when_its_adapter_loads(tmp_path, base_dir, smollm2_tokenizer):
    from safetensors.torch import load_file, save_file

    from tunelab.models.lineage import start_lineage
    from tunelab.models.loading import load_model
    from tunelab.models.run import load_run, load_weights

    save_lora_run(tmp_path / "a", load_model(str(base_dir)), smollm2_tokenizer, base_dir)
    save_lora_run(tmp_path / "b", load_weights(str(tmp_path / "a")), smollm2_tokenizer, tmp_path / "a", seed=1,
                  lineage=start_lineage(str(tmp_path / "a")))
    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    save_file({k: v * 2 for k, v in weights.items()}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ModelLoadError, match="has other weights or model configs"):
        load_run(tmp_path / "b")


def sft_config(tmp_path, model, out, **train):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"task": "sft", "output_dir": str(tmp_path / out), "model": {"name_or_path": str(model)},
            "data": {"train": {"path": str(data)}, "val_fraction": 0.25, "max_seq_len": 64},
            "lora": {"r": 4, "alpha": 8},
            "train": {"method": "lora", "max_steps": 2, "batch_size": 2, "lr": 1e-2, "threads": 1, "eval_every": 1,
                      **train},
            "eval": {"sample_questions": 0}}


def test_sft_from_an_sft_run_starts_at_its_held_out_loss_with_its_tokens_and_template(tmp_path, base_dir):
    from tunelab.models.run import load_start_tokenizer, load_weights
    from tunelab.recipes.sft import train

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    raw = sft_config(tmp_path, base_dir, "sft1")
    raw["model"].update(add_special_tokens=["<tool>"], chat_template=template)
    first = train(validate_config(raw), console=QUIET)
    tokenizer = load_start_tokenizer(str(tmp_path / "sft1"))
    assert "<tool>" in tokenizer.get_vocab() and "<|im_start|>{{ m['role'] }}" in tokenizer.chat_template
    assert load_weights(str(tmp_path / "sft1")).get_input_embeddings().weight.shape[0] >= len(tokenizer)

    second = train(validate_config(sft_config(tmp_path, tmp_path / "sft1", "sft2")), console=QUIET)
    assert second["held_out_before"]["loss"] == pytest.approx(first["held_out_after"]["loss"], abs=1e-5)
    info = json.loads((tmp_path / "sft2" / "tunelab.json").read_text())
    assert info["task"] == "sft" and info["base_model"] == str(tmp_path / "sft1")
    assert [(e["output_dir"], e["task"], e["method"]) for e in info["lineage"]] == [
        (str((tmp_path / "sft1").resolve()), "sft", "lora")]


PAIRS = [{"prompt": f"Question {i}?", "chosen": f"Restart service {i}.", "rejected": f"No idea about {i}, sorry."}
         for i in range(8)]


def recipe_config(tmp_path, task, start):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    raw = {"task": task, "output_dir": str(tmp_path / task), "model": {"name_or_path": str(start)},
           "data": {"train": {"path": str(pairs)}, "val_fraction": 0.25, "max_seq_len": 48},
           "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 1, "batch_size": 2, "lr": 1e-3, "threads": 1},
           "eval": {"sample_questions": 0, "batch_size": 4}}
    if task == "kto":
        raw.update(task="dpo", preference={"loss": "kto"})
    if task == "classification":
        labelled = tmp_path / "labels.jsonl"
        labelled.write_text("".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) + "\n" for i in range(8)))
        raw["data"]["train"] = {"path": str(labelled)}
        raw["classification"] = {}
    if task in ("ppo", "grpo"):
        raw["data"] = {"train": {"path": "builtin:arithmetic", "name": "add", "split": "train"}, "max_examples": 8,
                       "val_fraction": 0.25}
        raw["rl"] = {"num_generations": 2, "max_new_tokens": 4, "max_prompt_len": 64, "eval_prompts": 2,
                     "rewards": [{"type": "exact_match"}], "mini_batch_size": 2}
    return validate_config(raw)


@pytest.mark.parametrize("task", ["dpo", "kto", "reward", "classification", "ppo", "grpo"])
def test_every_recipe_that_loads_a_causal_lm_starts_from_a_run_and_records_its_lineage(
        tmp_path, base_dir, smollm2_tokenizer, task):
    import importlib

    from tunelab.models.loading import load_model
    from tunelab.models.run import load_run

    save_lora_run(tmp_path / "sft", load_model(str(base_dir)), smollm2_tokenizer, base_dir)
    module = {"kto": "dpo", "classification": "classify"}.get(task, task)
    importlib.import_module(f"tunelab.recipes.{module}").train(recipe_config(tmp_path, task, tmp_path / "sft"),
                                                               console=QUIET)
    out = tmp_path / task
    info = json.loads((out / "tunelab.json").read_text())
    assert [e["output_dir"] for e in info["lineage"]] == [str((tmp_path / "sft").resolve())]
    assert info["lineage"][0]["method"] == "lora" and info["lineage"][0]["task"] == "sft"
    load_run(out)  # the new adapter sits on the earlier run and loads through it


def test_dpo_from_a_run_measures_the_earlier_runs_log_probs_before_training(tmp_path, base_dir, smollm2_tokenizer):
    from tunelab.data.preference import PairTokenizer, preference_collate, prepare_pairs
    from tunelab.models.loading import load_model
    from tunelab.models.logps import eval_pair_logps
    from tunelab.models.run import load_run
    from tunelab.recipes.dpo import train

    save_lora_run(tmp_path / "sft", load_model(str(base_dir)), smollm2_tokenizer, base_dir)
    config = recipe_config(tmp_path, "dpo", tmp_path / "sft")
    results = train(config, console=QUIET)
    sft, tokenizer, _ = load_run(tmp_path / "sft")
    held = prepare_pairs(config.data, tokenizer, config.train.seed).validation
    expected = eval_pair_logps(sft, preference_collate(held, tokenizer.pad_token_id))
    assert results["held_out_before"]["logps/chosen"] == pytest.approx(expected.chosen.mean().item(), abs=1e-4)
    assert PairTokenizer  # the same tokenizer class the recipe uses


def test_checkpoints_unfinished_runs_classifiers_and_the_own_output_dir_are_refused(tmp_path, base_dir,
                                                                                   smollm2_tokenizer):
    from tunelab.models.lineage import start_lineage
    from tunelab.models.loading import load_model
    from tunelab.models.run import load_weights

    save_lora_run(tmp_path / "a", load_model(str(base_dir)), smollm2_tokenizer, base_dir)
    step = tmp_path / "a" / "checkpoints" / "step-000001"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="is a training checkpoint.*start from .*a, the run directory"):
        load_weights(str(step))
    step.rename(tmp_path / "a" / "checkpoints" / "step-000005")  # newer than the run's final step 1
    with pytest.raises(ModelLoadError, match="newest checkpoint step-000005 is newer than its final model"):
        start_lineage(str(tmp_path / "a"))
    (tmp_path / "a" / "tunelab.json").unlink()
    with pytest.raises(ModelLoadError, match="unfinished tunelab run .*no tunelab.json"):
        load_weights(str(tmp_path / "a"))

    from tunelab.models.run import save_run
    from tests.unit.classification.helpers import tiny_classifier

    save_run(tmp_path / "rm", tiny_classifier("decoder", vocab_size=len(smollm2_tokenizer), num_labels=1),
             smollm2_tokenizer, method="full", base_model=str(base_dir), config_yaml="task: reward\n",
             results={"steps": 1}, task_type="SEQ_CLS")
    with pytest.raises(ModelLoadError, match="is a SEQ_CLS run .*can start only from an earlier causal-LM run"):
        start_lineage(str(tmp_path / "rm"))
    with pytest.raises(ModelLoadError, match="this run's own output_dir"):
        start_lineage(str(tmp_path / "rm"), tmp_path / "rm")
    assert start_lineage(str(base_dir)) == [] and start_lineage("smollm2-135m-instruct") == []


def test_a_relative_base_loads_the_same_run_from_any_working_directory(tmp_path, base_dir, smollm2_tokenizer,
                                                                       monkeypatch):
    # tunelab.json kept base_model_path "a" as typed: from another directory holding its own "a", the
    # run loaded that one's weights silently (breaker, issue 18).
    from tunelab.models.lineage import start_lineage
    from tunelab.models.loading import load_model
    from tunelab.models.run import load_run, load_weights

    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    monkeypatch.chdir(tmp_path / "x")
    save_lora_run(tmp_path / "x" / "a", load_model(str(base_dir)), smollm2_tokenizer, base_dir)
    want = save_lora_run(tmp_path / "x" / "b", load_weights("a"), smollm2_tokenizer, "a", seed=1,
                         lineage=start_lineage("a"))
    info = json.loads((tmp_path / "x" / "b" / "tunelab.json").read_text())
    assert info["base_model_path"] == str((tmp_path / "x" / "a").resolve())
    save_lora_run(tmp_path / "y" / "a", load_model(str(base_dir)), smollm2_tokenizer, base_dir, seed=7)
    monkeypatch.chdir(tmp_path / "y")
    assert torch.allclose(logits(load_run(tmp_path / "x" / "b")[0]), want, atol=1e-5)
    info["base_model_path"] = "a"  # as runs written before this fix recorded it
    (tmp_path / "x" / "b" / "tunelab.json").write_text(json.dumps(info))
    assert torch.allclose(logits(load_run(tmp_path / "x" / "b")[0]), want, atol=1e-5)  # the lineage's own "a"


def test_an_edited_adapter_config_of_the_base_is_refused(tmp_path, base_dir, smollm2_tokenizer):
    from tunelab.models.lineage import start_lineage
    from tunelab.models.loading import load_model
    from tunelab.models.run import load_run, load_weights

    save_lora_run(tmp_path / "a", load_model(str(base_dir)), smollm2_tokenizer, base_dir)
    save_lora_run(tmp_path / "b", load_weights(str(tmp_path / "a")), smollm2_tokenizer, tmp_path / "a", seed=1,
                  lineage=start_lineage(str(tmp_path / "a")))
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] *= 8  # the weights are unchanged; the base's logits are not
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="has other weights or model configs"):
        load_run(tmp_path / "b")


def test_resume_refuses_a_start_run_replaced_while_paused(tmp_path, base_dir, smollm2_tokenizer):
    # A child paused by SIGTERM, its base --overwrite'n, then --resume: it trained on to the end on the
    # new base, kept the old base's "before" numbers and recorded the new digest (breaker, issue 18).
    from safetensors.torch import load_file, save_file

    from tunelab.models.lineage import START_RECORD, record_or_check_start
    from tunelab.models.loading import load_model

    save_lora_run(tmp_path / "a", load_model(str(base_dir)), smollm2_tokenizer, base_dir)
    child = tmp_path / "child"
    child.mkdir()
    record_or_check_start(str(tmp_path / "a"), child, resuming=False)
    assert json.loads((child / START_RECORD).read_text())[-1]["output_dir"] == str((tmp_path / "a").resolve())
    record_or_check_start(str(tmp_path / "a"), child, resuming=True)  # unchanged: resumes
    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ModelLoadError, match="--resume: this run started from .*replaced or edited"):
        record_or_check_start(str(tmp_path / "a"), child, resuming=True)
    record_or_check_start(str(base_dir), tmp_path / "plain", resuming=False) if (tmp_path / "plain").mkdir() \
        is None else None
    record_or_check_start(str(base_dir), tmp_path / "plain", resuming=True)  # a plain model: nothing to compare


def test_the_start_record_and_bookkeeping_temp_files_never_make_a_directory_hold_a_run(tmp_path):
    # A first attempt that failed after start_run (bad data) must leave a directory the next plain
    # `tunelab train` accepts; a race's loser saw the winner's .tmp- lock-info file as foreign content.
    from tunelab.training.outputs import check_output_dir
    from tunelab.training.outputs.writes import LINEAGE_START

    out = tmp_path / "run"
    out.mkdir()
    (out / LINEAGE_START).write_text("[]")
    (out / ".tmp-.tunelab.lock-8579-abc.json").write_text("{}")
    assert check_output_dir(out, resume=None, overwrite=False) is None

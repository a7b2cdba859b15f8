"""The reward and DPO recipes end to end on a tiny Llama (a few steps), and `tunelab score`."""

import json
import math

import pytest
import torch
from rich.console import Console

from tunelab.config.load import validate_config
from tunelab.models.run import read_run_info

PAIRS = [{"prompt": f"Question {i}: what should I do about error {i}?", "chosen": f"Restart service {i}.",
          "rejected": f"I am not sure what error {i} means, sorry, please ask someone else."} for i in range(10)]
QUIET = Console(quiet=True)


def write_pairs(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:7]))
    held.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[7:]))
    return train, held


def make_config(tmp_path, model_dir, task, **sections):
    train, held = write_pairs(tmp_path)
    raw = {"task": task, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model_dir)},
           "data": {"train": {"path": str(train)}, "validation": {"path": str(held)}, "max_seq_len": 64},
           "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "eval_every": 1, "threads": 1},
           "lora": {"r": 4, "alpha": 8}, "eval": {"sample_questions": 1, "max_new_tokens": 4}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_config(raw)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_lora_run_logs_every_metric_and_starts_at_ln2(tmp_path, tiny_model_dir):
    from tunelab.recipes.dpo import train

    results = train(make_config(tmp_path, tiny_model_dir, "dpo", data={"packing": True}), console=QUIET)
    before = results["held_out_before"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["rewards/margins"] == 0.0
    records = metrics(tmp_path / "run")
    step = next(r for r in records if "loss" in r)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
                "logps/rejected"):
        assert key in step and f"eval/{key}" in records[-1]
    assert step["units"] == 4  # pairs per optimizer step
    assert results["held_out_after"]["rewards/margins"] > 0  # lr 1e-2 on 7 pairs: the implicit margin grows
    assert read_run_info(tmp_path / "run")["method"] == "lora" and (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_full_finetuning_precomputes_the_reference_once_and_reuses_the_cache(tmp_path, tiny_model_dir):
    from tunelab.recipes.dpo import train

    config = make_config(tmp_path, tiny_model_dir, "dpo", train={"method": "full", "lr": 1e-3})
    train(config, console=QUIET)
    cache = tmp_path / "run" / "reference_logps" / "reference_logps.safetensors"
    stamp = cache.stat().st_mtime_ns
    train(config, overwrite=True, console=QUIET)
    assert cache.stat().st_mtime_ns == stamp  # same data and tokens: loaded, not recomputed


@pytest.mark.parametrize("loss", ["simpo", "orpo", "ipo", "hinge"])
def test_other_losses_train(tmp_path, tiny_model_dir, loss):
    from tunelab.recipes.dpo import train

    results = train(make_config(tmp_path, tiny_model_dir, "dpo", preference={"loss": loss}), console=QUIET)
    assert results["reference"] == ("none" if loss in ("simpo", "orpo") else "adapters_off")
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "run") if "loss" in r)


def test_dpo_from_an_sft_adapter_run_uses_the_sft_model_as_reference(tmp_path, tiny_model_dir):
    from tunelab.adapters.lora import inject_lora, lora_layers
    from tunelab.models.loading import load_model, load_tokenizer
    from tunelab.models.run import load_run, save_run
    from tunelab.recipes.dpo import train

    sft = load_model(str(tiny_model_dir))
    inject_lora(sft, "all-linear", r=4, alpha=8)
    for _, layer in lora_layers(sft):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_run(tmp_path / "sft", sft, load_tokenizer(str(tiny_model_dir)), method="lora", base_model=str(tiny_model_dir),
             config_yaml="", results={})
    config = make_config(tmp_path, tmp_path / "sft", "dpo", train={"max_steps": 1})
    results = train(config, console=QUIET)
    from tunelab.data.preference import PairTokenizer, preference_collate, to_preference_example, tokenize_pairs
    from tunelab.models.logps import eval_pair_logps

    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _ = tokenize_pairs([to_preference_example(p, {}, "r") for p in PAIRS[7:]], PairTokenizer(tok, 64))
    sft_logps = eval_pair_logps(load_run(tmp_path / "sft")[0], preference_collate(pairs, tok.pad_token_id))
    assert results["held_out_before"]["logps/chosen"] == pytest.approx(sft_logps.chosen.mean().item(), abs=1e-4)
    info = read_run_info(tmp_path / "run")  # the DPO adapter sits on the SFT run (stage chaining)
    assert info["method"] == "lora" and info["lineage"][0]["output_dir"] == str((tmp_path / "sft").resolve())
    load_run(tmp_path / "run")


def test_reward_model_lora_trains_the_head_saves_it_and_scores(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from tunelab.cli.preference_cmds import score_pairs
    from tunelab.recipes.reward import train

    config = make_config(tmp_path, tiny_model_dir, "reward", data={"packing": False}, train={"max_steps": 3})
    results = train(config, console=QUIET)
    after = results["held_out_after"]
    assert 0.0 <= after["accuracy_low"] <= after["accuracy"] <= after["accuracy_high"] <= 1.0 and after["pairs"] == 3
    run = tmp_path / "run"
    assert "base_model.model.score.weight" in load_file(str(run / "adapter_model.safetensors"))
    assert json.loads((run / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    summary = score_pairs(run, str(tmp_path / "held.jsonl"), None, "train", 2, None, tmp_path / "s.jsonl", 2, QUIET)
    assert summary["accuracy"] == after["accuracy"]
    assert summary["margin"] == pytest.approx(after["margin"], abs=1e-4)
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 3
    (tmp_path / "s.jsonl").write_text("old\n")
    again = score_pairs(run, str(tmp_path / "held.jsonl"), None, "train", 2, None, tmp_path / "s.jsonl", 2, QUIET,
                        overwrite=True)
    assert again == summary and len((tmp_path / "s.jsonl").read_text().splitlines()) == 3


def test_wilson_interval_matches_the_formula():
    from tunelab.recipes.reward import wilson_interval

    # p = 81/123 = 0.658537, z^2/n = 0.031231: centre = (p + z^2/2n) / (1 + z^2/n) = 0.653736,
    # half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 1.96 * 0.043493 / 1.031231 = 0.082663
    low, high = wilson_interval(81, 123)
    assert (round(low, 4), round(high, 4)) == (0.5711, 0.7364)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_generate_rejected_writes_pairs_with_the_real_answer_as_chosen(tmp_path, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    import tunelab.models.generate
    from tunelab.cli.app import app

    calls = []

    def fake_replies(model, tokenizer, conversations, max_new_tokens):
        calls.append(len(conversations))
        return ["answer 2" if c[-1]["content"] == "q2" else f"model reply to {c[-1]['content']}" for c in conversations]

    monkeypatch.setattr(tunelab.models.generate, "generate_replies", fake_replies)
    conversations = tmp_path / "conv.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(3)] + [{"messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "b"}]},
                                  {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "q0"},
                                                {"role": "assistant", "content": "other"}]}]
    conversations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["generate-rejected", "--data", str(conversations), "--out", str(out), "--model",
                                      str(tiny_model_dir), "--max-new-tokens", "3", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert calls == [2, 2]  # 4 distinct prompts (q0 twice as the same prompt), 2 per generate() call
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["chosen"] for p in pairs] == ["answer 0", "answer 1", "b", "other"]  # q2: model said the answer
    assert [p["rejected"] for p in pairs] == ["model reply to q0", "model reply to q1", "model reply to q0",
                                              "model reply to q0"]
    assert pairs[0]["prompt"] == "q0" and pairs[3]["prompt"][0]["role"] == "system"  # multi-turn stays a list
    assert "'skipped_equal': 1" in " ".join(result.output.split())
    out.write_text("old\n")
    again = CliRunner().invoke(app, ["generate-rejected", "--data", str(conversations), "--out", str(out), "--model",
                                     str(tiny_model_dir), "--max-new-tokens", "3", "--batch-size", "2", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == pairs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_reward_scores_equal_padded(smollm2_tokenizer, attn):
    from transformers import LlamaForSequenceClassification

    from tunelab.data.preference import PairTokenizer, preference_collate, preference_packed_collate
    from tunelab.data.tokenize import DataStats
    from tunelab.models.logps import reward_scores
    from tunelab.recipes.reward import reward_loss
    from tests.unit.classification.helpers import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(vocab_size=len(smollm2_tokenizer), num_labels=1,
                                                             pad_token_id=smollm2_tokenizer.pad_token_id))
    model.config._attn_implementation = attn
    model.eval()
    encode = PairTokenizer(smollm2_tokenizer, 64)
    pairs = [encode(p, DataStats(), index=i) for i, p in enumerate(PAIRS[:5])]
    padded = preference_collate(pairs, smollm2_tokenizer.pad_token_id)
    packed = preference_packed_collate([pairs[:2], pairs[2:]], smollm2_tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(reward_scores(model, packed), reward_scores(model, padded), atol=1e-5)
        loss_packed, metrics_packed = reward_loss(model, packed, 5)
        loss_padded, metrics_padded = reward_loss(model, padded, 5)
    assert loss_packed == pytest.approx(loss_padded.item(), abs=1e-6)
    assert set(metrics_packed) == set(metrics_padded)
    for key in metrics_padded:
        assert metrics_packed[key].item() == pytest.approx(metrics_padded[key].item(), abs=1e-5), key


def test_packed_reward_model_trains_and_encoders_refuse_packing(tmp_path, tiny_model_dir):
    from tunelab.errors import ConfigError
    from tunelab.models.loading import load_tokenizer
    from tunelab.recipes.reward import train
    from tests.unit.classification.helpers import tiny_base_dir

    results = train(make_config(tmp_path, tiny_model_dir, "reward", data={"packing": True}), console=QUIET)
    assert results["steps"] == 2 and results["held_out_after"]["pairs"] == 3
    encoder = tiny_base_dir("encoder", tmp_path / "enc", load_tokenizer("all-minilm-l6-v2"))
    config = make_config(tmp_path, encoder, "reward", data={"packing": True})
    config.output_dir = str(tmp_path / "enc-run")
    with pytest.raises(ConfigError, match="needs a decoder reward model"):
        train(config, console=QUIET)
    assert not (tmp_path / "enc-run" / "tunelab.json").exists()


def test_reward_head_linear_probe_runs_before_training(tmp_path, tiny_model_dir):
    from tunelab.recipes.reward import train

    config = make_config(tmp_path, tiny_model_dir, "reward", preference={"head_init": "linear_probe"},
                         eval={"before_training": True})
    results = train(config, console=QUIET)
    probe = results["linear_probe"]
    assert probe["pairs"] == 7 and probe["sequences"] == 14 and 0.0 <= probe["train_pairwise_accuracy"] <= 1.0
    assert results["held_out_before"]["margin"] != 0.0  # the head is no longer the random init near zero


def test_head_init_is_refused_outside_reward():
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="preference.head_init"):
        validate_config({"task": "dpo", "model": {"name_or_path": "x"}, "data": {"train": {"path": "p.jsonl"}},
                         "preference": {"head_init": "linear_probe"}})


def test_a_run_moved_to_a_machine_without_the_recorded_base_path_still_loads(tmp_path, tiny_model_dir):
    """tunelab.json records the resolved base path (e.g. a GGUF conversion cache); when that path is
    missing on another machine, load_run resolves the original reference (alias, hub id, directory)."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.run import load_run
    from tunelab.recipes.reward import train

    train(make_config(tmp_path, tiny_model_dir, "reward", train={"max_steps": 1}), console=QUIET)
    info_path = tmp_path / "run" / "tunelab.json"
    info = json.loads(info_path.read_text())
    expected, _, _ = load_run(tmp_path / "run", AutoModelForSequenceClassification, num_labels=1)
    info["base_model_path"] = "/home/someone-else/.cache/tunelab/gguf/gone"
    info_path.write_text(json.dumps(info))
    moved, _, _ = load_run(tmp_path / "run", AutoModelForSequenceClassification, num_labels=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(moved(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_a_lora_reward_model_loads_with_its_one_output_head_without_being_told(tmp_path, tiny_model_dir):
    """The PPO reward term loads the run without num_labels; the base alone would get 2 outputs."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.config.rl import RewardModelReward
    from tunelab.models.run import load_run
    from tunelab.recipes.reward import train
    from tunelab.rollout.rewards import build_reward_terms

    train(make_config(tmp_path, tiny_model_dir, "reward", train={"max_steps": 1}), console=QUIET)
    model, _, _ = load_run(tmp_path / "run", AutoModelForSequenceClassification)
    assert model.score.out_features == 1
    terms = build_reward_terms([RewardModelReward(type="reward_model", run_dir=str(tmp_path / "run"))],
                               torch.device("cpu"))
    assert len(terms) == 1


def test_overwrite_replaces_the_old_runs_checkpoints_once_training_starts(tmp_path, tiny_model_dir):
    from tunelab.recipes.reward import train
    from tunelab.training.checkpoint import list_checkpoints

    train(make_config(tmp_path, tiny_model_dir, "reward", train={"max_steps": 3}), console=QUIET)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000003"]
    train(make_config(tmp_path, tiny_model_dir, "reward", train={"max_steps": 2}), overwrite=True, console=QUIET)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000002"]


def test_resuming_a_finished_run_changes_nothing_and_says_why(tmp_path, tiny_model_dir):
    from tunelab.errors import TunelabError
    from tunelab.recipes.reward import train

    config = make_config(tmp_path, tiny_model_dir, "reward")
    train(config, console=QUIET)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(TunelabError, match="the run is finished"):
        train(config, resume=True, console=QUIET)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before


@pytest.mark.parametrize("task", ["reward", "dpo"])
def test_a_run_resumed_for_more_steps_keeps_its_before_training_results(tmp_path, tiny_model_dir, task):
    import importlib

    train = importlib.import_module(f"tunelab.recipes.{task}").train
    first = train(make_config(tmp_path, tiny_model_dir, task, train={"max_steps": 2}), console=QUIET)
    resumed = train(make_config(tmp_path, tiny_model_dir, task, train={"max_steps": 3}), resume=True, console=QUIET)
    assert first["held_out_before"] and resumed["held_out_before"] == first["held_out_before"]

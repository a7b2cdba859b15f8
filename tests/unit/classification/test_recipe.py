"""The classify recipe end to end on tiny models: single/multi-label/regression, LoRA, eval/predict CLI."""

import json

import pytest
import torch

from tunelab.config.load import validate_config
from tunelab.errors import TunelabError
from tunelab.recipes.classify import train
from tests.unit.classification.helpers import tiny_base_dir

WORDS = {"pos": ["great", "good", "wonderful", "helped"], "neg": ["awful", "bad", "terrible", "worse"],
         "neu": ["okay", "average", "unsure", "mixed"]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n=36):
    names = sorted(WORDS)
    return [{"review": f"the drug was {WORDS[names[i % 3]][i % 4]} for me", "rating": names[i % 3]}
            for i in range(n)]


def make_config(tmp_path, model_dir, data, metric_for_best="accuracy", **classification):
    selection = {k: classification.pop(k) for k in ("early_stopping_patience", "early_stopping_min_delta")
                 if k in classification}
    raw = {
        "task": "classification", "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"path": str(data)}, "val_fraction": 0.25, "max_seq_len": 32},
        "train": {"method": "full", "epochs": 16, "batch_size": 8, "grad_accum": 1, "lr": 5e-3, "warmup_steps": 0,
                  "eval_every": 8, "save_every": 8, "threads": 1, "metric_for_best": metric_for_best, **selection},
        "eval": {"before_training": True},
        "classification": {"text_field": "review", "label_field": "rating",
                           **classification},
    }
    return raw


def quiet():
    from rich.console import Console

    return Console(quiet=True)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from tunelab.models.loading import load_tokenizer

    return tiny_base_dir("encoder", tmp_path_factory.mktemp("enc"), load_tokenizer("all-minilm-l6-v2"))


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory, smollm2_tokenizer):
    return tiny_base_dir("decoder", tmp_path_factory.mktemp("dec"), smollm2_tokenizer)


def test_single_label_encoder_full_learns_and_saves_label_names(tmp_path, encoder_dir):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows())
    results = train(validate_config(make_config(tmp_path, encoder_dir, data)), console=quiet())
    assert results["held_out_best"]["accuracy"] > results["held_out_before"]["accuracy"]
    assert results["held_out_best"]["accuracy"] == 1.0
    assert results["label_space"]["names"] == ["neg", "neu", "pos"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and saved["label2id"]["pos"] == 2
    assert (tmp_path / "run" / "confusion_matrix.png").stat().st_size > 0

    from tunelab.cli.classify_cmds import evaluate_run, predict_run

    metrics = evaluate_run(tmp_path / "run", str(data), out=tmp_path / "eval.json")
    assert metrics["num_examples"] == 36 and metrics["accuracy"] > 0.9
    assert metrics["accuracy_low"] <= metrics["accuracy"] <= metrics["accuracy_high"]  # 95% intervals (issue 18)
    assert metrics["macro_f1_low"] <= metrics["macro_f1"] <= metrics["macro_f1_high"]
    assert (tmp_path / "eval.png").is_file()
    unlabelled = write_jsonl(tmp_path / "new.jsonl", [{"review": "the drug was wonderful for me"}])
    assert predict_run(tmp_path / "run", str(unlabelled), tmp_path / "preds.jsonl") == 1
    pred = json.loads((tmp_path / "preds.jsonl").read_text())
    assert pred["prediction"] == "pos" and abs(sum(pred["probabilities"].values()) - 1) < 1e-5
    with pytest.raises(TunelabError, match="preds.jsonl already exists"):
        predict_run(tmp_path / "run", str(unlabelled), tmp_path / "preds.jsonl")
    (tmp_path / "preds.jsonl").write_text("old\n")
    assert predict_run(tmp_path / "run", str(unlabelled), tmp_path / "preds.jsonl", overwrite=True) == 1
    assert json.loads((tmp_path / "preds.jsonl").read_text())["prediction"] == "pos"
    (tmp_path / "eval.json").unlink()  # the PNG beside it is guarded too
    with pytest.raises(TunelabError, match="eval.png already exists"):
        evaluate_run(tmp_path / "run", str(data), out=tmp_path / "eval.json")
    assert evaluate_run(tmp_path / "run", str(data), out=tmp_path / "eval.json", overwrite=True)["num_examples"] == 36


def test_decoder_lora_with_head_learns_and_reloads(tmp_path, decoder_dir):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows())
    raw = make_config(tmp_path, decoder_dir, data, class_weights="balanced")
    raw["train"].update(method="lora", lr=1e-2)
    raw["lora"] = {"r": 4, "alpha": 8}
    results = train(validate_config(raw), console=quiet())
    assert results["head_modules"] == ["score"]
    assert results["held_out_best"]["accuracy"] > results["held_out_before"]["accuracy"]
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["score"] and adapter["task_type"] == "SEQ_CLS"

    from tunelab.cli.classify_cmds import evaluate_run

    held = evaluate_run(tmp_path / "run", str(data))
    assert held["accuracy"] >= results["held_out_best"]["accuracy"] - 0.35  # reloaded model is the trained one

    # `tunelab merge` gives a plain transformers classifier with the same logits; `tunelab chat` refuses
    from transformers import AutoModelForSequenceClassification
    from typer.testing import CliRunner

    from tunelab.cli.app import app
    from tunelab.models.heads import sequence_logits
    from tunelab.models.run import load_run

    merged_dir = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "run"), "--out", str(merged_dir)])
    assert result.exit_code == 0, result.output
    ours, _, _ = load_run(tmp_path / "run", AutoModelForSequenceClassification)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(sequence_logits(merged, batch), sequence_logits(ours, batch), atol=1e-5)
    result = CliRunner().invoke(app, ["chat", str(tmp_path / "run"), "--prompt", "hi"])
    from tunelab.errors import TunelabError  # the console script turns it into a one-line message, exit 2

    assert isinstance(result.exception, TunelabError) and "not a chat model" in str(result.exception)


def train_loss_curve(tmp_path, model_dir, rows, **classification):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    raw = make_config(tmp_path, model_dir, data, **classification)
    raw["data"]["val_fraction"] = 0.0
    raw["train"].update(max_steps=24, eval_every=None, save_every=None, metric_for_best=None)  # no held-out data
    train(validate_config(raw), console=quiet())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_multi_label_head_trains(tmp_path, decoder_dir):
    rows = [{"review": f"side effects {w}", "rating": tags} for w, tags in
            [("nausea", ["nausea"]), ("headache", ["headache"]), ("nausea headache", ["nausea", "headache"]),
             ("none at all", [])] * 4]
    losses = train_loss_curve(tmp_path, decoder_dir, rows, problem_type="multi_label", metric_for_best="micro_f1")
    assert losses[-1] < losses[0] * 0.7
    assert json.loads((tmp_path / "run" / "config.json").read_text())["problem_type"] == "multi_label_classification"


def test_regression_head_trains(tmp_path, decoder_dir):
    rows = [{"review": f"I rate it {w}", "rating": score} for w, score in
            [("great", 0.8), ("bad", -0.9), ("fine", 0.1), ("superb", 1.0)] * 4]
    losses = train_loss_curve(tmp_path, decoder_dir, rows, problem_type="regression", metric_for_best="mse")
    assert losses[-1] < losses[0] * 0.5


def test_early_stopping_ends_the_run_and_keeps_best(tmp_path, encoder_dir):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows())
    raw = make_config(tmp_path, encoder_dir, data, early_stopping_patience=1, early_stopping_min_delta=0.5,
                      metric_for_best="macro_f1")
    raw["train"].update(eval_every=1, save_every=1, epochs=10)
    results = train(validate_config(raw), console=quiet())
    assert results["stopped_early"] and results["steps"] == 2 and results["best_step"] == 1
    assert results["held_out_best"]["macro_f1"] == pytest.approx(next(
        json.loads(x)["eval/macro_f1"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"step": 1,' in x and "eval/macro_f1" in x))  # the saved weights are step 1's


def test_eval_of_a_directory_that_is_not_a_classification_run_is_a_clean_error(tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli.app import app

    (tmp_path / "config.json").write_text("{}")
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--data", "x.jsonl"])
    assert result.exit_code != 0 and "not a finished classification run" in str(result.exception)

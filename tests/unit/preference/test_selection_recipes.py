"""Issue 14 rule 6 per recipe: best-checkpoint selection and early stopping work for SFT (held-out loss),
DPO (held-out preference accuracy) and reward models (pairwise accuracy), through the shared loop."""

import json

import pytest

from tests.unit.preference.test_preference_recipes import PAIRS, QUIET, make_config, metrics

# patience 1 with an unreachable min_delta: evaluation 1 sets the best, evaluation 2 cannot beat it → stop.
SELECTION = {"max_steps": 4, "eval_every": 1, "save_every": 1, "keep_last": 1, "early_stopping_patience": 1,
             "early_stopping_min_delta": 100.0}


def _sft_config(tmp_path, model_dir):
    rows = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}
            for p in PAIRS]
    config = make_config(tmp_path, model_dir, "dpo", train={**SELECTION, "metric_for_best": "loss"})
    raw = config.model_dump(exclude={"preference"})
    train, held = tmp_path / "sft_train.jsonl", tmp_path / "sft_held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:7]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[7:]))
    raw.update(task="sft")
    raw["data"].update(train={"path": str(train)}, validation={"path": str(held)})
    from tunelab.config.load import validate_config

    return validate_config(raw)


@pytest.mark.parametrize("task, metric", [("sft", "loss"), ("dpo", "policy/accuracy"), ("reward", "accuracy")])
def test_early_stopping_and_best_selection_per_recipe(tmp_path, tiny_model_dir, task, metric):
    import importlib

    train = importlib.import_module(f"tunelab.recipes.{task}").train
    config = _sft_config(tmp_path, tiny_model_dir) if task == "sft" else \
        make_config(tmp_path, tiny_model_dir, task, train={**SELECTION, "metric_for_best": metric})
    results = train(config, console=QUIET)
    run = tmp_path / "run"
    assert results["stopped_early"] and results["steps"] == 2 and results["best_step"] == 1
    assert results["metric_for_best"] == metric
    step1 = next(r for r in metrics(run) if r["step"] == 1 and f"eval/{metric}" in r)
    assert results["best_value"] == pytest.approx(step1[f"eval/{metric}"])
    assert results["held_out_after"][metric] == pytest.approx(step1[f"eval/{metric}"])  # the saved weights' eval
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    saved = json.loads((run / "tunelab.json").read_text())["results"]
    assert saved["best_step"] == 1 and saved["stopped_early"]

"""Issue 14 rule 6: with train.metric_for_best the best checkpoint is never rotated away, is recorded in the
training state (kept across --resume), its weights are the ones fit leaves in the model; early stopping
with patience; eval/save intervals that could not save the best step are a config error."""

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from tunelab.config.schema import TrainConfig
from tunelab.data.batching import sft_batch_plan
from tunelab.data.tokenize import TokenizedExample
from tunelab.errors import TunelabError
from tunelab.models.causal_lm import lm_loss
from tunelab.training.checkpoint import list_checkpoints
from tunelab.training.loop import fit
from tests.conftest import make_tiny_llama


def _fit(tmp_path, values, max_steps, resume_from=None, **train):
    """fit a tiny Llama; the k-th evaluation reports ``values[k]`` as held-out loss (and as 'acc', where higher is better)."""
    gen = torch.Generator().manual_seed(0)
    exs = [TokenizedExample(ids := torch.randint(3, 97, (6 + i,), generator=gen).tolist(), ids) for i in range(8)]
    plan = sft_batch_plan(exs, batch_size=1, max_seq_len=32, packing=False, shuffle=False, seed=0, pad_token_id=0)
    cfg = TrainConfig(**{"method": "full", "max_steps": max_steps, "batch_size": 1, "grad_accum": 1, "lr": 1e-2,
                         "eval_every": 1, "save_every": 1, "keep_last": 1, "metric_for_best": "loss", **train})
    model = make_tiny_llama()
    calls = iter(values)

    def evaluate():
        value = next(calls)
        return {"loss": value, "acc": value}

    result = fit(model, plan, lm_loss, lambda b: b["num_supervised"], cfg, tmp_path, "cfg", evaluate=evaluate,
                 resume_from=resume_from, quiet=True)
    return result, model


def _steps(tmp_path):
    return [int(p.name.split("-")[1]) for p in list_checkpoints(tmp_path)]


def _same_weights(model, ckpt):
    saved = load_file(str(ckpt / "trainable.safetensors"))
    return all(torch.equal(p.detach(), saved[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("metric, values, best", [("loss", [3.0, 1.0, 2.0, 2.5, 2.6, 2.7], 2),
                                                  ("acc", [3.0, 1.0, 2.0, 2.5, 2.6, 2.7], 1)])
def test_best_checkpoint_survives_rotation_and_its_weights_are_returned(tmp_path, metric, values, best):
    result, model = _fit(tmp_path, values, 6, metric_for_best=metric)
    assert result.state.best_step == best and _steps(tmp_path) == [best, 6]  # keep_last=1 + the best
    state = json.loads((tmp_path / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["best_step"] == best and state["best_value"] == values[best - 1]
    assert _same_weights(model, tmp_path / "checkpoints" / f"step-{best:06d}")
    assert not _same_weights(model, tmp_path / "checkpoints" / "step-000006")
    assert result.held_out()["loss"] == values[best - 1]


def test_resume_keeps_competing_against_the_recorded_best(tmp_path):
    _fit(tmp_path, [3.0, 1.0, 2.0, 2.5], 4)
    assert _steps(tmp_path) == [2, 4]
    result, model = _fit(tmp_path, [1.5, 1.2], 6, resume_from=tmp_path / "checkpoints" / "step-000004")
    assert result.state.best_step == 2 and _steps(tmp_path) == [2, 6]  # 1.5 and 1.2 do not beat step 2's 1.0
    assert _same_weights(model, tmp_path / "checkpoints" / "step-000002")
    result, _ = _fit(tmp_path / "again", [3.0, 1.0, 2.0, 2.5], 4)
    result, _ = _fit(tmp_path / "again", [0.5, 0.7], 6, resume_from=tmp_path / "again" / "checkpoints" / "step-000004")
    assert result.state.best_step == 5 and _steps(tmp_path / "again") == [5, 6]  # the old best was rotated away


def test_early_stopping_with_patience_saves_the_stop_and_refuses_resume(tmp_path):
    result, model = _fit(tmp_path, [2.0, 1.0, 1.0 - 1e-4, 1.1, 0.1, 0.1], 6, early_stopping_patience=2,
                         early_stopping_min_delta=1e-3)
    assert result.state.stopped_early and result.state.step == 4 and result.state.best_step == 2
    assert _steps(tmp_path) == [2, 4]
    assert _same_weights(model, tmp_path / "checkpoints" / "step-000002")
    # The recipe has not written its final files yet (killed after the early stop's checkpoint):
    # --resume finishes the run without training: the state stays at step 4 with the best weights.
    again, again_model = _fit(tmp_path, [0.1], 6, resume_from=tmp_path / "checkpoints" / "step-000004")
    assert again.state.step == 4 and again.state.stopped_early and again.state.best_step == 2
    assert _same_weights(again_model, tmp_path / "checkpoints" / "step-000002")
    # Once the final files record step 4, the run is finished and a resume is refused.
    (tmp_path / "tunelab.json").write_text(json.dumps({"results": {"steps": 4}}))
    with pytest.raises(TunelabError, match="stopped early at step 4"):
        _fit(tmp_path, [0.1], 6, resume_from=tmp_path / "checkpoints" / "step-000004")


def test_selection_needs_held_out_data_and_a_reported_metric(tmp_path):
    with pytest.raises(TunelabError, match="train.metric_for_best=acc is not among the held-out metrics"):
        _fit_reporting_loss_only(tmp_path)


def _fit_reporting_loss_only(tmp_path):
    exs = [TokenizedExample([3, 4, 5, 6], [3, 4, 5, 6])] * 2
    plan = sft_batch_plan(exs, batch_size=1, max_seq_len=32, packing=False, shuffle=False, seed=0, pad_token_id=0)
    cfg = TrainConfig(method="full", max_steps=2, grad_accum=1, eval_every=1, save_every=1, metric_for_best="acc")
    fit(make_tiny_llama(), plan, lm_loss, lambda b: b["num_supervised"], cfg, tmp_path, "cfg",
        evaluate=lambda: {"loss": 1.0}, quiet=True)


def test_metric_for_best_without_evaluation_is_refused(tmp_path):
    exs = [TokenizedExample([3, 4, 5, 6], [3, 4, 5, 6])] * 2
    plan = sft_batch_plan(exs, batch_size=1, max_seq_len=32, packing=False, shuffle=False, seed=0, pad_token_id=0)
    cfg = TrainConfig(method="full", max_steps=2, grad_accum=1, metric_for_best="loss")
    with pytest.raises(TunelabError, match="needs held-out data"):
        fit(make_tiny_llama(), plan, lm_loss, lambda b: b["num_supervised"], cfg, tmp_path, "cfg", quiet=True)


@pytest.mark.parametrize("train, ok", [
    ({"eval_every": 4, "save_every": 2}, True), ({"eval_every": 4, "save_every": 4}, True),
    ({"eval_every": None, "save_every": None}, True),  # only the final evaluation, always saved
    ({"eval_every": 4, "save_every": 3}, False), ({"eval_every": 4, "save_every": None}, False),
    ({"eval_every": 2, "save_every": 4}, False),
])
def test_intervals_that_cannot_save_the_best_step_are_a_config_error(train, ok):
    if ok:
        TrainConfig(metric_for_best="loss", **train)
        return
    with pytest.raises(ValidationError, match="could not be saved; set train.save_every to 4|set train.save_every to 2"):
        TrainConfig(metric_for_best="loss", **train)


def test_patience_needs_a_metric():
    with pytest.raises(ValidationError, match="early_stopping_patience needs train.metric_for_best"):
        TrainConfig(early_stopping_patience=2)


@pytest.mark.parametrize("task, metric, ok", [
    ("sft", "loss", True), ("sft", "token_accuracy", True), ("sft", "accuracy", False),
    ("dpo", "policy/accuracy", True), ("dpo", "loss", True), ("dpo", "token_accuracy", False),
    ("reward", "accuracy", True), ("reward", "policy/accuracy", False), ("grpo", "loss", False),
    ("kto", "pairs/policy/accuracy", True), ("kto", "policy/accuracy", False),
])
def test_metric_names_are_checked_per_task(task, metric, ok):
    from tunelab.config.load import validate_config
    from tunelab.errors import ConfigError

    raw = {"task": task, "model": {"name_or_path": "x"}, "data": {"train": {"path": "x"}},
           "train": {"metric_for_best": metric}}
    if task == "kto":
        raw.update(task="dpo", preference={"loss": "kto"})
    if task == "grpo":
        raw["rl"] = {"rewards": [{"type": "exact_match"}]}
    if ok:
        assert validate_config(raw).train.metric_for_best == metric
    else:
        with pytest.raises(ConfigError, match="metric_for_best"):
            validate_config(raw)


def test_eval_every_not_below_the_steps_warns_that_metric_for_best_selects_nothing(tmp_path, capsys):
    # The CUAD configs once set eval_every 22 for a run of 17 steps (grad_accum defaults to 8): the run
    # evaluated only at its end and "best-step selection" selected nothing, silently.
    _fit(tmp_path / "a", [1.0], 3, eval_every=3, save_every=3)
    out = capsys.readouterr().out
    assert "train.eval_every=3 is not below the run's 3 optimizer steps" in out and "selects nothing" in out
    _fit(tmp_path / "b", [1.0, 2.0], 3, eval_every=2, save_every=2)
    assert "selects nothing" not in capsys.readouterr().out


def test_a_fresh_run_removes_an_earlier_runs_tracker_dirs_and_a_resume_keeps_them(tmp_path):
    # --overwrite with a config that no longer reports to MLflow kept the old run's mlruns/ (and the
    # board listed its curves as this run's); user files beside them stay.
    for sub in ("mlruns", "wandb", "tensorboard"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "old.txt").write_text("old run")
    (tmp_path / "notes.txt").write_text("mine")
    _fit(tmp_path, [1.0, 2.0], 2)
    assert not any((tmp_path / sub).exists() for sub in ("mlruns", "wandb", "tensorboard"))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "mlruns").mkdir()
    _fit(tmp_path, [1.0, 2.0], 3, resume_from=tmp_path / "checkpoints" / "step-000002")
    assert (tmp_path / "mlruns").is_dir()


def test_overwrite_removes_the_old_runs_completion_marker_before_training(tmp_path):
    # kill -9 of an --overwrite run after its last checkpoint, before its final save, left the old
    # tunelab.json (same step count): --resume said "finished" and chaining started from the old model.
    from tunelab.training.checkpoint import run_finished

    (tmp_path / "tunelab.json").write_text(json.dumps({"results": {"steps": 2}}))
    assert run_finished(tmp_path, 2)
    _fit(tmp_path, [1.0, 2.0], 2)
    assert not (tmp_path / "tunelab.json").exists() and not run_finished(tmp_path, 2)

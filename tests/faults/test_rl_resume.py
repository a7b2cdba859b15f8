"""Item 4 of issue 15 for the RL loops: SIGTERM during a GRPO or PPO step finishes the step, checkpoints it
(policy, value head, optimizer, scheduler, RNG, sampling generator, KL coefficient, score statistics) and
stops; ``--resume`` then gives exactly the uninterrupted run (every logged metric and the final weights)."""

from __future__ import annotations

import importlib
import json
import os
import signal

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tunelab.config.load import validate_config
from tunelab.training.interrupt import RunInterrupted
from tunelab.training.manifest import manifest_problems

QUIET = Console(quiet=True)
STEP_FN = {"grpo": "grpo_step", "ppo": "ppo_step"}


def rl_config(tmp_path, model_dir, task, name):
    rewards = [{"type": "exact_match"}, {"type": "length_penalty", "max_tokens": 2, "weight": 0.5}]
    extra = {"adaptive_kl": True, "kl_target": 0.01} if task == "ppo" else {"beta": 0.1}
    return validate_config({
        "task": task, "output_dir": str(tmp_path / name), "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"path": "builtin:arithmetic", "name": "add", "split": "train"}, "max_examples": 20},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "threads": 1},
        "eval": {"batch_size": 4, "before_training": False},
        "rl": {"num_generations": 2, "max_new_tokens": 4, "max_prompt_len": 128, "rewards": rewards,
               "mini_batch_size": 2, "ppo_epochs": 2, "log_samples_every": 1, **extra},
    })


def records(run):
    keep = lambda r: {k: v for k, v in r.items() if k != "step_s"}  # noqa: E731 - wall time differs
    return [keep(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["grpo", "ppo"])
def test_sigterm_mid_run_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch, task):
    recipe = importlib.import_module(f"tunelab.recipes.{task}")
    recipe.train(rl_config(tmp_path, tiny_model_dir, task, "whole"), console=QUIET)

    real_step, calls = getattr(recipe, STEP_FN[task]), []

    def step_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # SIGTERM arrives during step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    config = rl_config(tmp_path, tiny_model_dir, task, "stopped")
    with monkeypatch.context() as mp:
        mp.setattr(recipe, STEP_FN[task], step_then_sigterm)
        with pytest.raises(RunInterrupted) as stop:
            recipe.train(config, console=QUIET)
    assert stop.value.step == 2 and stop.value.exit_status == 143
    assert manifest_problems(tmp_path / "stopped" / "checkpoints" / "step-000002") == []
    assert not (tmp_path / "stopped" / "tunelab.json").exists()
    recipe.train(config, resume=True, console=QUIET)
    assert records(tmp_path / "stopped") == records(tmp_path / "whole")
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("stopped", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if task == "ppo":
        heads = [load_file(p) for p in (tmp_path / "stopped").glob("value_head*.safetensors")]
        assert heads and all(torch.equal(heads[0][k], load_file(next((tmp_path / "whole").glob(
            "value_head*.safetensors")))[k]) for k in heads[0])


def test_resume_on_other_training_prompts_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    # The RL step count points into the prompt order: edited data.train would resume on other prompts.
    from tunelab.errors import TunelabError
    from tunelab.recipes import grpo
    from tunelab.rollout.checkpoints import prompts_fingerprint
    from tunelab.rollout.prompts import Prompt

    a = [Prompt([{"role": "user", "content": "1+1"}], [5, 6], {"answer": "2"})]
    b = [Prompt([{"role": "user", "content": "1+1"}], [5, 6], {"answer": "3"})]  # a reward field edited
    assert prompts_fingerprint(a) != prompts_fingerprint(b) and prompts_fingerprint(a) == prompts_fingerprint(list(a))
    real_step, calls = grpo.grpo_step, []

    def step_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    config = rl_config(tmp_path, tiny_model_dir, "grpo", "stopped")
    with monkeypatch.context() as mp:
        mp.setattr(grpo, "grpo_step", step_then_sigterm)
        with pytest.raises(RunInterrupted):
            grpo.train(config, console=QUIET)
    state_path = tmp_path / "stopped" / "checkpoints" / "step-000002" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["data_sha256"]
    monkeypatch.setattr(grpo, "prompts_fingerprint", lambda prompts: "0" * 64)  # as if data.train was edited
    with pytest.raises(TunelabError, match="--resume: the training prompts are not the ones checkpoint"):
        grpo.train(config, resume=True, console=QUIET)

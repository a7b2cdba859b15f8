"""Issue 19: the prepared GPU script (bench/gpu_fsdp_check.sh → gpu_fsdp_check.py → gpu_recipes.py) builds a
run for every recipe. On CPU: its arguments parse, every recipe's model, data and config are written and
validated, the configs ask for FSDP2 with a checkpoint at step 2, and one recipe (GRPO) really trains
through the script's own run path (one-rank gloo group) with a sharded checkpoint."""

from __future__ import annotations

import pytest
import torch

from bench.gpu_fsdp_check import parse_args
from bench.gpu_recipes import TASKS, build_tokenizer, plan, run_recipe


def test_arguments_pick_recipes_and_refuse_unknown_ones():
    assert parse_args([]).recipes == list(TASKS) and not parse_args([]).no_loop_checks
    assert parse_args(["--recipes", "grpo,ppo", "--no-loop-checks"]).recipes == ["grpo", "ppo"]
    assert parse_args(["--recipes", "none"]).recipes == []
    with pytest.raises(SystemExit):
        parse_args(["--recipes", "sft,rlhf"])


def test_plan_writes_a_valid_fsdp_config_for_every_recipe(tmp_path):
    configs = plan(tmp_path, cuda=False)
    assert list(configs) == list(TASKS) == ["sft", "classification", "reward", "dpo", "kto", "grpo", "ppo"]
    assert {t: c.task for t, c in configs.items()}["kto"] == "dpo" and configs["kto"].preference.loss == "kto"
    for config in configs.values():
        assert config.distributed.strategy == "fsdp" and config.train.save_every == 2
    gpu = plan(tmp_path / "gpu", cuda=True, tasks=["sft"])["sft"]  # the GPU sizes and precision, not trained
    assert gpu.train.precision == "bf16"
    tokenizer = build_tokenizer()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "the printer"}], add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_the_script_runs_a_recipe_under_fsdp_on_a_one_rank_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    torch.set_num_threads(1)
    config = plan(tmp_path, cuda=False, tasks=["grpo"])["grpo"]
    try:
        result = run_recipe("grpo", config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert result["ok"] and result["sharded_checkpoint"] and result["steps_logged"] == 4, result

"""A tiny-Llama training run through :func:`tunelab.training.loop.fit` with a real resolved config, so the
fault tests can interrupt it, damage its checkpoints and resume it the way ``tunelab train --resume`` does
(:func:`tunelab.recipes.prepare.check_output_dir` picks the checkpoint)."""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.conftest import make_tiny_llama
from tests.invariants.test_training import examples
from tunelab.config.load import dump_config
from tunelab.config.schema import Config
from tunelab.data.batching import sft_batch_plan
from tunelab.models.causal_lm import lm_loss
from tunelab.recipes.prepare import check_output_dir, setup_trainable
from tunelab.training.loop import fit

STEPS = 6


def tiny_config(out: Path, **train: Any) -> Config:
    """A LoRA run of ``STEPS`` steps, batch 2 × accumulation 2, a checkpoint every 2 steps, dropout on."""
    settings = {"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "save_every": 2, "warmup_steps": 1,
                "max_grad_norm": 1.0, "keep_last": 5, **train}
    return Config.model_validate({"output_dir": str(out), "model": {"name_or_path": "tiny"},
                                  "data": {"train": {"path": "x.jsonl"}, "max_seq_len": 64},
                                  "train": settings, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}})


def train_tiny(out: Path, *, resume: bool = False, overwrite: bool = False,
               on_micro_batch: Callable[[int], None] | None = None, evaluate: Callable[[], dict] | None = None,
               runtime: Any = None, **train: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train (or ``--resume``) the tiny run in ``out``; returns every logged loss and the final trainable weights.

    ``on_micro_batch(i)`` runs before the loss of the i-th micro-batch this call computes (1-based).
    """
    config = tiny_config(out, **train)
    resume_from = check_output_dir(out, resume, overwrite)
    model = make_tiny_llama(dropout=0.1)
    setup_trainable(model, config)
    tc = config.train
    plan = sft_batch_plan(examples(), batch_size=tc.batch_size, max_seq_len=64, packing=True, shuffle=True, seed=0,
                          pad_token_id=0)
    calls = []

    def loss_fn(m, b, n):
        calls.append(1)
        if on_micro_batch is not None:
            on_micro_batch(len(calls))
        return lm_loss(m, b, n)

    result = fit(model, plan, loss_fn, lambda b: b["num_supervised"], tc, out, dump_config(config),
                 evaluate=evaluate, resume_from=resume_from, quiet=True, runtime=runtime)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return [r["loss"] for r in result.history if "loss" in r], weights


def assert_same_run(a: tuple[list[float], dict], b: tuple[list[float], dict]) -> None:
    """Losses of every step and the final weights agree (resume ≡ uninterrupted)."""
    assert len(a[0]) == len(b[0]) == STEPS, (a[0], b[0])
    for x, y in zip(a[0], b[0]):
        assert abs(x - y) < 1e-6, (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], atol=1e-6), name


def in_child(fn: Callable[[], None], timeout_s: int = 60) -> int:
    """Run ``fn`` in a forked copy of this process (no new interpreter, no torch import: ~0.1 s) and
    return its wait status as ``os.waitstatus_to_exitcode`` gives it (``-9`` = killed by SIGKILL)."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            signal.alarm(timeout_s)
            fn()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # noqa: BLE001 - report, then exit
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)

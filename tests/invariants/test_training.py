"""Training-loop invariants on a tiny Llama: accumulation equivalence, exact resume, LR schedule."""

import copy
import json
import math

import pytest
import torch

from tunelab.config.schema import TrainConfig
from tunelab.data.batching import sft_batch_plan
from tunelab.data.collate import pad_collate
from tunelab.data.tokenize import TokenizedExample
from tunelab.models.causal_lm import lm_loss
from tunelab.recipes.prepare import setup_trainable
from tunelab.training.loop import BatchPlan, fit
from tunelab.training.optim import build_optimizer, build_scheduler, lr_multiplier
from tests.conftest import make_tiny_llama


def examples(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(3, 97, (length,), generator=gen).tolist()
        prompt = 2 + i % 4  # different supervised lengths per example
        out.append(TokenizedExample(ids, [-100] * prompt + ids[prompt:]))
    return out


def grads_after_accumulation(batch_size):
    model = make_tiny_llama()
    model.train()
    exs = examples()
    micro = [pad_collate([(e.input_ids, e.labels) for e in exs[i : i + batch_size]], 0)
             for i in range(0, len(exs), batch_size)]
    normalizer = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    total = 0.0
    for batch in micro:
        loss, _ = lm_loss(model, batch, normalizer)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_is_token_normalized_and_batch_size_invariant():
    loss8, g8 = grads_after_accumulation(8)
    for batch_size in (1, 2):
        loss, g = grads_after_accumulation(batch_size)
        assert abs(loss - loss8) < 1e-5
        for name in g8:
            assert torch.allclose(g[name], g8[name], atol=1e-5), name


def test_mean_of_micro_batch_means_would_differ():
    """Guard: the examples really have different supervised lengths, so the invariant above can fail."""
    model = make_tiny_llama()
    exs = examples()
    with torch.no_grad():
        per = [float(lm_loss(model, pad_collate([(e.input_ids, e.labels)], 0), e.num_supervised)[0]) for e in exs]
    loss8, _ = grads_after_accumulation(8)
    assert abs(sum(per) / len(per) - loss8) > 1e-3


class Crash(Exception):
    pass


def run(tmp_path, max_steps, resume_from=None, method="lora", crash_after_micro_batches=None):
    from tunelab.config.schema import Config

    model = make_tiny_llama(dropout=0.1)
    config = Config.model_validate({"model": {"name_or_path": "x"}, "data": {"train": {"path": "x"}},
                                    "train": {"method": method}, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}})
    setup_trainable(model, config)
    cfg = TrainConfig(max_steps=max_steps, batch_size=2, grad_accum=2, lr=1e-2, save_every=2, warmup_steps=1,
                      max_grad_norm=1.0, keep_last=5)
    plan = sft_batch_plan(examples(), batch_size=cfg.batch_size, max_seq_len=64, packing=True, shuffle=True,
                          seed=0, pad_token_id=0)
    calls = []

    def loss_fn(m, b, n):
        calls.append(1)
        if crash_after_micro_batches is not None and len(calls) > crash_after_micro_batches:
            raise Crash()
        return lm_loss(m, b, n)

    result = fit(model, plan, loss_fn, lambda b: b["num_supervised"], cfg, tmp_path, "cfg",
                 resume_from=resume_from, quiet=True)
    return [r["loss"] for r in result.history if "loss" in r], model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, method):
    torch.manual_seed(0)
    full_losses, full_model = run(tmp_path / "a", 6, method=method)
    torch.manual_seed(0)
    with pytest.raises(Crash):  # the same run, killed during step 4 (checkpoint at step 2)
        run(tmp_path / "b", 6, method=method, crash_after_micro_batches=7)
    assert not (tmp_path / "b" / "checkpoints" / "step-000004").exists()
    torch.manual_seed(123)  # the checkpoint must restore RNG state itself
    resumed, resumed_model = run(tmp_path / "b", 6, resume_from=tmp_path / "b" / "checkpoints" / "step-000002",
                                 method=method)
    assert len(resumed) == 6
    for a, b in zip(full_losses, resumed):
        assert abs(a - b) < 1e-6
    for (n, p), (_, q) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_a_finished_run_resumed_for_more_steps_continues_at_the_new_schedules_rate(tmp_path, monkeypatch):
    """Resuming step 4 of a 4-step run with max_steps=8: step 5 must use the 8-step schedule's rate
    (cosine, 1 warmup step), not the 0 that the finished 4-step schedule left in the optimizer."""
    run(tmp_path, 4)
    used = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    losses, _ = run(tmp_path, 8, resume_from=tmp_path / "checkpoints" / "step-000004")
    assert used == pytest.approx([1e-2 * lr_multiplier(s, 8, 1, "cosine") for s in range(4, 8)])
    assert used[0] > 0


def test_logged_lr_is_the_rate_each_step_used(tmp_path):
    run(tmp_path, 4)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert [r["lr"] for r in lines] == pytest.approx([1e-2 * lr_multiplier(s, 4, 1, "cosine") for s in range(4)])


def test_a_nan_loss_stops_training_before_any_update_or_checkpoint(tmp_path):
    """Steps 1-2 train and checkpoint; step 3's loss is NaN: a clear error, weights and checkpoints intact."""
    from tunelab.errors import TunelabError

    model = make_tiny_llama()
    cfg = TrainConfig(max_steps=4, batch_size=2, grad_accum=1, lr=1e-2, save_every=2, keep_last=1)
    plan = sft_batch_plan(examples(), batch_size=2, max_seq_len=64, packing=True, shuffle=False, seed=0,
                          pad_token_id=0)
    calls, snapshot = [], {}

    def loss_fn(m, b, n):
        calls.append(1)
        loss, metrics = lm_loss(m, b, n)
        if len(calls) == 3:
            snapshot.update({k: v.detach().clone() for k, v in m.named_parameters()})
            return loss * float("nan"), metrics
        return loss, metrics

    with pytest.raises(TunelabError, match="step 3: the gradient norm is nan"):
        fit(model, plan, loss_fn, lambda b: b["num_supervised"], cfg, tmp_path, "cfg", quiet=True)
    for name, p in model.named_parameters():
        assert torch.equal(p, snapshot[name]), name
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


def test_checkpoints_are_complete_and_pruned(tmp_path):
    run(tmp_path, 6)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004", "step-000006"]
    state = json.loads((tmp_path / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["step"] == 4 and state["micro_batches"] == 8
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "config.yaml"):
        assert (tmp_path / "checkpoints" / "step-000004" / name).is_file()
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_warmup_cosine_values_per_step_independent_of_accumulation():
    # 10 steps, 2 warmup: step 1 = 1/2, step 2 = the peak, then cosine over the 8 remaining steps
    # (towards 0 one step after the last).
    expected = [1 / 2, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 9)) for k in range(1, 9)]
    got = [lr_multiplier(s, 10, 2, "cosine") for s in range(10)]
    assert got == pytest.approx(expected)
    for grad_accum in (1, 4):
        model = make_tiny_llama()
        cfg = TrainConfig(lr=0.1, warmup_steps=2, grad_accum=grad_accum, schedule="cosine")
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg, 10)
        lrs = []
        for _ in range(10):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs == pytest.approx([0.1 * e for e in expected])
    assert lr_multiplier(5, 10, 0, "linear") == pytest.approx(0.5)  # no warmup: step 1 at the peak
    assert lr_multiplier(7, 10, 2, "constant") == 1.0

"""Item 7 of issue 15: a resumed run's config against its checkpoint's ``config.yaml``: keys that cannot
change are refused with the list of differences, keys that may change take effect and are listed; a new
``train.lr`` is the rate actually used from the resumed step on."""

from __future__ import annotations

import pytest
import torch

from tests.faults.tiny import train_tiny
from tunelab.errors import TunelabError
from tunelab.training.optim import lr_multiplier
from tunelab.training.resume import config_changes, may_change


@pytest.mark.parametrize("changes", [
    {"lr": 0.05},
    {"lr": 0.05, "max_steps": 8},
])
def test_a_changed_lr_is_used_from_the_resumed_step_and_listed(tmp_path, monkeypatch, capsys, changes):
    out = tmp_path / "run"
    train_tiny(out, max_steps=4)
    used, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train_tiny(out, resume=True, **{"max_steps": 6, **changes})  # from step 4
    total = changes.get("max_steps", 6)
    assert used == pytest.approx([0.05 * lr_multiplier(s, total, 1, "cosine") for s in range(4, total)])
    printed = capsys.readouterr().out
    assert "train.lr: 0.01 -> 0.05" in printed and "train.max_steps: 4 -> " in printed


@pytest.mark.parametrize("changes,keys", [
    ({"batch_size": 1}, ["train.batch_size"]),
    ({"method": "full"}, ["train.method"]),
    ({"seed": 3, "weight_decay": 0.1}, ["train.seed", "train.weight_decay"]),
])
def test_keys_that_cannot_change_are_refused_with_every_difference(tmp_path, changes, keys):
    out = tmp_path / "run"
    train_tiny(out, max_steps=2)
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(TunelabError, match="cannot change in a resumed run") as err:
        train_tiny(out, resume=True, max_steps=4, **changes)
    for key in keys:
        assert f"{key}: " in str(err.value)
    assert "train.max_steps" not in str(err.value)  # allowed changes are not refused
    assert (out / "metrics.jsonl").read_bytes() == metrics  # nothing written


def test_the_split_between_fixed_and_changeable_keys():
    old = "model: {name_or_path: a}\nlora: {r: 4, alpha: 8}\ndata: {max_seq_len: 64, train: {path: x}}\n" \
          "train: {lr: 0.1, eval_every: 2, batch_size: 2}\neval: {max_new_tokens: 8}\ntask: sft\n"
    new = "model: {name_or_path: b}\nlora: {r: 8, alpha: 8}\ndata: {max_seq_len: 128, train: {path: y}}\n" \
          "train: {lr: 0.2, eval_every: 5, batch_size: 2}\neval: {max_new_tokens: 16}\ntask: dpo\n"
    refused, allowed = config_changes(old, new)
    refused_keys = {r.split(":")[0] for r in refused}
    assert {"data.max_seq_len", "data.train.path", "lora.r", "model.name_or_path", "task"} <= refused_keys
    assert all(k.startswith("preference") for k in refused_keys - {"data.max_seq_len", "data.train.path",
                                                                    "lora.r", "model.name_or_path", "task"})
    assert [a.split(":")[0] for a in allowed] == ["eval.max_new_tokens", "train.eval_every", "train.lr"]
    assert may_change("distributed.strategy") and not may_change("train.lr_typo") and not may_change("rl.beta")
    assert config_changes("cfg", new) == ([], [])


def test_a_key_added_to_the_schema_after_the_checkpoint_is_not_a_change():
    """A checkpoint's config.yaml from before a key existed lacks it: its default is what that run used."""
    from tunelab.config.load import dump_config, validate_config

    raw = {"model": {"name_or_path": "a"}, "data": {"train": {"path": "x.jsonl"}}}
    full = dump_config(validate_config(raw))
    old = full.replace("  keep_last: 2\n", "")  # as if train.keep_last had not existed yet
    assert old != full
    assert config_changes(old, full) == ([], [])
    assert config_changes(old, full.replace("keep_last: 2", "keep_last: 3")) == ([], ["train.keep_last: 2 -> 3"])

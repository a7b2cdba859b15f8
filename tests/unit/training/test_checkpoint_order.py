"""Issue 14 rule 5: checkpoints are ordered by numeric step, so rotation never deletes the newest."""

import torch

from tunelab.training.checkpoint import TrainState, list_checkpoints, save_checkpoint


def _save(tmp_path, step, keep_last):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=step, micro_batches=step), "cfg", keep_last)


def test_steps_past_six_digits_sort_after_smaller_ones_and_rotation_keeps_the_newest(tmp_path):
    for step in (99_999, 999_999, 1_000_000, 10_000_000):
        _save(tmp_path, step, keep_last=10)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-099999", "step-999999", "step-1000000", "step-10000000"]
    _save(tmp_path, 10_000_001, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-10000000", "step-10000001"]

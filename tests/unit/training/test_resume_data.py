"""--resume refuses training data that changed since the checkpoint (every recipe that trains through fit).

A folder source with a file added after SIGTERM resumed silently on other chunks (breaker, issue 18): the
data position is a micro-batch count, so it pointed at other examples. Fails on the old code.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_llama
from tunelab.config.schema import TrainConfig
from tunelab.data.batching import sft_batch_plan
from tunelab.data.tokenize import TokenizedExample
from tunelab.errors import TunelabError
from tunelab.models.causal_lm import lm_loss
from tunelab.training.loop import fit


def _plan(changed: int | None = None, extra: int = 0):
    gen = torch.Generator().manual_seed(0)
    exs = []
    for i in range(8 + extra):
        ids = torch.randint(3, 97, (6 + i % 5,), generator=gen).tolist()
        if i == changed:
            ids[2] = (ids[2] + 1) % 97 + 3  # one token of one document edited
        exs.append(TokenizedExample(ids, ids))
    return sft_batch_plan(exs, batch_size=1, max_seq_len=32, packing=False, shuffle=True, seed=0, pad_token_id=0)


def _fit(out, plan, max_steps, resume_from=None):
    cfg = TrainConfig(method="full", max_steps=max_steps, batch_size=1, grad_accum=1, lr=1e-2, save_every=1)
    return fit(make_tiny_llama(), plan, lm_loss, lambda b: b["num_supervised"], cfg, out, "cfg",
               resume_from=resume_from, quiet=True)


@pytest.mark.parametrize("changed, extra", [(3, 0), (None, 1)])
def test_resume_on_edited_or_added_data_is_refused(tmp_path, changed, extra):
    _fit(tmp_path, _plan(), 2)
    ckpt = tmp_path / "checkpoints" / "step-000002"
    with pytest.raises(TunelabError, match=r"--resume: the training data is not the data checkpoint .* was trained on"):
        _fit(tmp_path, _plan(changed, extra), 4, resume_from=ckpt)
    result = _fit(tmp_path, _plan(), 4, resume_from=ckpt)  # the same data: resumes
    assert result.state.step == 4 and result.state.data_sha256


def test_checkpoints_without_a_data_record_still_resume(tmp_path):
    import json

    _fit(tmp_path, _plan(), 2)
    ckpt = tmp_path / "checkpoints" / "step-000002"
    state = json.loads((ckpt / "state.json").read_text())
    del state["data_sha256"]  # as written before the record existed
    (ckpt / "state.json").write_text(json.dumps(state))
    assert _fit(tmp_path, _plan(changed=3), 4, resume_from=ckpt).state.step == 4

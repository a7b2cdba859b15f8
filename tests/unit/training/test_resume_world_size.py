"""Issue 14 rule 7: resuming with another world_size × grad_accum is refused with a message naming both
(never a silent change of what a step and an epoch are); the same product on other ranks resumes."""

import json

import pytest
import torch

from tunelab.config.schema import TrainConfig
from tunelab.data.batching import sft_batch_plan
from tunelab.data.tokenize import TokenizedExample
from tunelab.errors import TunelabError
from tunelab.models.causal_lm import lm_loss
from tunelab.training.loop import fit
from tests.conftest import make_tiny_llama


def _fit(tmp_path, grad_accum, max_steps, resume_from=None):
    gen = torch.Generator().manual_seed(0)
    exs = [TokenizedExample(ids := torch.randint(3, 97, (6 + i,), generator=gen).tolist(), ids) for i in range(8)]
    plan = sft_batch_plan(exs, batch_size=1, max_seq_len=32, packing=False, shuffle=False, seed=0, pad_token_id=0)
    cfg = TrainConfig(method="full", max_steps=max_steps, batch_size=1, grad_accum=grad_accum, lr=1e-3,
                      save_every=1, keep_last=5)
    return fit(make_tiny_llama(), plan, lm_loss, lambda b: b["num_supervised"], cfg, tmp_path, "cfg",
               resume_from=resume_from, quiet=True)


def test_resume_with_another_grad_accum_is_refused_naming_both_products(tmp_path):
    _fit(tmp_path, grad_accum=2, max_steps=2)
    ckpt = tmp_path / "checkpoints" / "step-000001"
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(TunelabError, match=r"1 × 2 = 2 micro-batches per optimizer step; this run takes 1 × 3 = 3.*"
                                           r"set train.grad_accum=2"):
        _fit(tmp_path, grad_accum=3, max_steps=4, resume_from=ckpt)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing was changed


def test_same_product_on_another_world_size_resumes_and_another_product_is_refused(tmp_path):
    _fit(tmp_path, grad_accum=4, max_steps=2)
    ckpt = tmp_path / "checkpoints" / "step-000001"
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "world_size": 2}))  # as if 2 ranks × grad_accum 2
    with pytest.raises(TunelabError, match=r"2 × 2 = 4 micro-batches .* this run takes 1 × 2 = 2"):
        _fit(tmp_path, grad_accum=2, max_steps=3, resume_from=ckpt)
    result = _fit(tmp_path, grad_accum=4, max_steps=3, resume_from=ckpt)  # 1 × 4 = 2 × 2: exact
    assert result.state.step == 3 and result.state.micro_batches == 12

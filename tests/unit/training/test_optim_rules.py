"""Issue 14 rules 1-2: the warmup convention and which parameters weight decay skips."""

import json

import pytest
import torch
from torch import nn

from tunelab.config.schema import TrainConfig
from tunelab.data.batching import sft_batch_plan
from tunelab.data.tokenize import TokenizedExample
from tunelab.models.causal_lm import lm_loss
from tunelab.training.loop import fit
from tunelab.training.optim import build_optimizer, lr_multiplier
from tests.conftest import make_tiny_llama


def _examples(n=12):
    gen = torch.Generator().manual_seed(0)
    return [TokenizedExample(ids := torch.randint(3, 97, (8 + i,), generator=gen).tolist(), [-100] * 2 + ids[2:])
            for i in range(n)]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("grad_accum", [1, 3])
def test_first_step_uses_lr_over_w_and_step_w_reaches_the_peak(tmp_path, monkeypatch, schedule, grad_accum):
    used = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    w, lr = 3, 0.01
    cfg = TrainConfig(method="full", max_steps=6, batch_size=1, grad_accum=grad_accum, lr=lr, warmup_steps=w,
                      schedule=schedule)
    plan = sft_batch_plan(_examples(), batch_size=1, max_seq_len=64, packing=False, shuffle=False, seed=0,
                          pad_token_id=0)
    fit(make_tiny_llama(), plan, lm_loss, lambda b: b["num_supervised"], cfg, tmp_path, "cfg", quiet=True)
    assert used[:w] == pytest.approx([lr / w, 2 * lr / w, lr])  # step 1 = lr/w ... step w = peak
    assert max(used) == pytest.approx(lr)
    if schedule != "constant":
        assert all(b < a for a, b in zip(used[w - 1:], used[w:]))  # decays right after the peak
    logged = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert logged == pytest.approx(used)  # metrics.jsonl 'lr' is the rate the step used


def test_warmup_ratio_follows_the_same_convention_and_no_warmup_starts_at_the_peak():
    assert [lr_multiplier(s, 10, 0, "linear") for s in range(3)] == pytest.approx([1.0, 0.9, 0.8])
    assert [lr_multiplier(s, 20, 4, "constant") for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1, 1])


def _decay_names(model):
    opt = build_optimizer(model, TrainConfig(method="full", weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    skipped = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    return decayed, skipped


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def test_gpt2_embeddings_norms_and_biases_are_not_decayed():
    decayed, skipped = _decay_names(_tiny_gpt2())
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            "transformer.h.0.ln_1.bias", "transformer.h.1.attn.c_attn.bias"} <= skipped
    assert decayed == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


@pytest.mark.parametrize("tie", [True, False])
def test_llama_embed_tokens_and_rmsnorms_are_not_decayed_and_a_tied_head_follows_the_embedding(tie):
    model = make_tiny_llama(tie=tie)
    decayed, skipped = _decay_names(model)
    assert "model.embed_tokens.weight" in skipped and "model.norm.weight" in skipped
    assert all(n in skipped for n in decayed | skipped if "layernorm" in n)
    assert "model.layers.0.self_attn.q_proj.weight" in decayed
    assert ("lm_head.weight" in decayed) is (not tie)  # tied: the same tensor as embed_tokens, not decayed


def test_decay_is_chosen_by_module_type_not_parameter_name():
    class OddNames(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_proj = nn.Linear(4, 4)  # a projection whose name says "embed": decayed
            self.tok = nn.Embedding(10, 4)  # an embedding without "embed" in its name: not decayed
            self.final = FancyRMSNorm(4)

    class FancyRMSNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1, dim))  # 2-D gain: skipped for being a norm

    from tunelab.training.optim import no_decay_parameters

    decayed, skipped = _decay_names(OddNames())
    assert decayed == {"embed_proj.weight"}
    assert skipped == {"embed_proj.bias", "tok.weight", "final.weight"}
    assert len(no_decay_parameters(OddNames())) == 3


def test_norm_classes_of_every_family_are_recognised():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from tunelab.training.optim import is_norm_module

    for norm in (GemmaRMSNorm(8), LlamaRMSNorm(8), T5LayerNorm(8), nn.LayerNorm(8), nn.BatchNorm1d(8),
                 nn.GroupNorm(2, 8), nn.RMSNorm(8)):
        assert is_norm_module(norm), type(norm).__name__
    assert not any(is_norm_module(m) for m in (nn.Linear(2, 2), nn.Embedding(3, 2), nn.Dropout()))

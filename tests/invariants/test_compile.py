"""train.compile: compiled layers train like eager ones, keep parameter names, and fail clearly.

Tolerance (fp32, CPU inductor): loss within 1e-5 and every LoRA gradient within 1e-5 absolute of
eager (measured here: ≤ 2e-6 and ≤ 5e-7; inductor fuses and reorders reductions, so not bit-equal).
Each test compiles a 2-layer model; with a warm inductor cache (``/tmp/torchinductor_$USER``)
a compile takes a few seconds, on a fresh machine up to about a minute.
"""

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend

import tunelab.training.compile as compile_module
from tunelab.adapters.lora import inject_lora
from tunelab.config.schema import Config, TrainConfig
from tunelab.data.batching import sft_batch_plan
from tunelab.errors import TunelabError
from tunelab.models.attention import register
from tunelab.models.causal_lm import lm_loss
from tunelab.recipes.prepare import enable_gradient_checkpointing, setup_trainable
from tunelab.training.compile import compiled_layers
from tunelab.training.loop import fit
from tests.conftest import make_tiny_llama
from tests.invariants.test_training import examples

TOL = 1e-5
register()


def packed_batches():
    """Packed rows of a different length each (12 ... 41 tokens), two examples per row."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for length in (12, 17, 23, 41, 9):
        ids = torch.randint(3, 97, (1, length), generator=gen)
        labels = ids.clone()
        labels[0, :3] = -100
        position_ids = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)])[None]
        out.append({"input_ids": ids, "labels": labels, "position_ids": position_ids})
    return out


def lora_model(attn: str, checkpointing: bool):
    model = make_tiny_llama()
    model.config._attn_implementation = attn
    inject_lora(model, "all-linear", r=4, alpha=8)
    gen = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so every adapter gets a gradient
            torch.nn.init.normal_(p, std=0.05, generator=gen)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def losses_and_grads(model, batches):
    out = []
    for batch in batches:
        loss, _ = lm_loss(model, batch, 8)
        loss.backward()
        out.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("attn,checkpointing", [("sdpa", False), ("sdpa_varlen", True)])
def test_compiled_lora_loss_and_gradients_equal_eager_without_recompiling(monkeypatch, attn, checkpointing):
    batches = packed_batches()
    eager = losses_and_grads(lora_model(attn, checkpointing), batches)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    monkeypatch.setattr(compile_module, "BACKEND", counter)
    model = lora_model(attn, checkpointing)
    names = list(model.state_dict())
    with compiled_layers(model, True) as layers:
        assert len(layers) == 2
        compiled = losses_and_grads(model, batches[:1])
        frames_after_first = counter.frame_count
        compiled += losses_and_grads(model, batches[1:])
        assert list(model.state_dict()) == names  # no _orig_mod. prefixes while compiled
    assert frames_after_first > 0  # the layers really were compiled (a no-op compile would pass the rest)
    assert counter.frame_count == frames_after_first  # four new row lengths, no recompile
    assert "forward" not in vars(model.model.layers[0])  # eager forward restored on exit
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled):
        assert abs(loss_e - loss_c) < TOL
        assert grads_e.keys() == grads_c.keys() and grads_e
        for name in grads_e:
            assert torch.allclose(grads_e[name], grads_c[name], atol=TOL, rtol=0), name


def run_fit(tmp_path, compile_: bool):
    model = make_tiny_llama()
    model.config._attn_implementation = "sdpa_varlen"
    config = Config.model_validate({"model": {"name_or_path": "x"}, "data": {"train": {"path": "x"}},
                                    "train": {"gradient_checkpointing": True}, "lora": {"r": 4, "alpha": 8}})
    setup_trainable(model, config)
    cfg = TrainConfig(max_steps=3, batch_size=2, grad_accum=2, lr=1e-2, save_every=2, warmup_steps=1, compile=compile_)
    plan = sft_batch_plan(examples(), batch_size=cfg.batch_size, max_seq_len=64, packing=True, shuffle=True,
                          seed=0, pad_token_id=0, flatten_rows=True)
    torch.manual_seed(0)
    result = fit(model, plan, lm_loss, lambda b: b["num_supervised"], cfg, tmp_path, "cfg", quiet=True)
    return [r["loss"] for r in result.history if "loss" in r], model


def test_compiled_fit_matches_eager_and_checkpoints_the_same_keys(tmp_path, monkeypatch):
    """Three optimizer steps through fit (sdpa_varlen, flattened packed rows, activation checkpointing):
    same losses, same trained adapters, and the checkpoint written while compiled has eager's keys."""
    eager_losses, eager_model = run_fit(tmp_path / "eager", False)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    monkeypatch.setattr(compile_module, "BACKEND", counter)
    compiled_losses, compiled_model = run_fit(tmp_path / "compiled", True)
    assert counter.frame_count > 0  # fit honoured train.compile
    assert len(compiled_losses) == 3
    for a, b in zip(eager_losses, compiled_losses):
        assert abs(a - b) < TOL
    step2 = [load_file(tmp_path / run / "checkpoints" / "step-000002" / "trainable.safetensors")
             for run in ("eager", "compiled")]
    assert sorted(step2[0]) == sorted(step2[1]) and any("lora_A" in k for k in step2[0])
    trained = dict(compiled_model.named_parameters())
    for name, p in eager_model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, trained[name], atol=1e-4, rtol=0), name  # 3 AdamW steps at lr 1e-2


def test_compile_failure_names_the_config_key(monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    torch._dynamo.reset()
    monkeypatch.setattr(compile_module, "BACKEND", broken_backend)
    model = lora_model("sdpa", False)
    with pytest.raises(TunelabError) as err:
        with compiled_layers(model, True):
            losses_and_grads(model, packed_batches()[:1])
    assert "train.compile" in str(err.value) and "no C++ compiler found" in str(err.value)
    assert "forward" not in vars(model.model.layers[0])

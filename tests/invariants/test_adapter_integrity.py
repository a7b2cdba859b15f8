"""Issue 13 items 7, 8, 13: adapters load whole or not at all, only whole adapters are written, and
PEFT's per-module rank/alpha patterns round-trip. peft is the reference oracle; two architectures."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.artifact_fixtures import make_tiny_qwen2
from tests.conftest import make_tiny_llama
from tunelab.adapters.lora import inject_lora, lora_layers
from tunelab.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from tunelab.errors import ModelLoadError

peft = pytest.importorskip("peft")
IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 2]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_adapter(tmp_path, make=make_tiny_llama, **kwargs):
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kwargs})
    model = peft.get_peft_model(make(), config)
    gen = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    model.save_pretrained(tmp_path / "peft")
    return model, tmp_path / "peft"


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2])
def test_partial_adapter_is_refused_and_the_model_left_alone(tmp_path, make):
    """A PEFT adapter missing one lora_B tensor (old code: loaded A, served the base for that layer)."""
    _, directory = peft_adapter(tmp_path, make)
    state = load_file(str(directory / WEIGHTS_NAME))
    dropped = next(k for k in state if "layers.1.self_attn.v_proj.lora_B" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, str(directory / WEIGHTS_NAME))
    model = make()
    with pytest.raises(ModelLoadError, match=r"7 of 8 adapter tensors matched.*layers\.1\.self_attn\.v_proj\.lora_B"):
        load_adapter(model, directory)
    assert not list(lora_layers(model))


def test_adapter_missing_a_targeted_module_is_refused(tmp_path):
    """The config targets k_proj too, but the file has no k_proj tensors at all."""
    _, directory = peft_adapter(tmp_path)
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["target_modules"] = ["q_proj", "v_proj", "k_proj"]
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"8 of 12 adapter tensors matched.*k_proj\.lora_A"):
        load_adapter(make_tiny_llama(), directory)


def test_adapter_of_another_base_model_is_refused(tmp_path):
    """Same names, other hidden size: every factor has the wrong shape."""
    _, directory = peft_adapter(tmp_path, make_tiny_llama)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ModelLoadError, match=r"0 of 8 adapter tensors matched.*wrong shape"):
        load_adapter(wider, directory)


def test_merge_and_chat_refuse_a_partial_run(tmp_path):
    from typer.testing import CliRunner

    from tests.artifact_fixtures import word_tokenizer
    from tunelab.cli.app import app

    tok = word_tokenizer()
    base = make_tiny_llama(vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    inject_lora(base, ["q_proj", "v_proj"], r=2, alpha=4)
    save_adapter(base, tmp_path / "run", base_model_name_or_path=str(tmp_path / "base"))
    tok.save_pretrained(tmp_path / "run")
    state = load_file(str(tmp_path / "run" / WEIGHTS_NAME))
    save_file({k: v for k, v in state.items() if "layers.0.self_attn.q_proj.lora_A" not in k},
              str(tmp_path / "run" / WEIGHTS_NAME))
    runner = CliRunner()
    merged = runner.invoke(app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert isinstance(merged.exception, ModelLoadError) and "7 of 8 adapter tensors matched" in str(merged.exception)
    assert not (tmp_path / "merged").exists()
    chat = runner.invoke(app, ["chat", str(tmp_path / "run"), "--prompt", "hello"])
    assert isinstance(chat.exception, ModelLoadError) and "adapter tensors matched" in str(chat.exception)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2])
def test_rank_and_alpha_patterns_load_and_save(tmp_path, make):
    """peft adapter with per-module r/alpha → tunelab (same logits) → tunelab save → peft (same logits)."""
    reference, directory = peft_adapter(tmp_path, make, rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                                        alpha_pattern={"q_proj": 3.0})
    ours = make()
    load_adapter(ours, directory)
    ranks = {name: (layer.r, layer.alpha) for name, layer in lora_layers(ours)}
    assert ranks["model.layers.0.self_attn.v_proj"] == (2, 8.0)
    assert ranks["model.layers.1.self_attn.q_proj"] == (6, 3.0)
    assert ranks["model.layers.0.self_attn.q_proj"] == (4, 3.0)
    assert torch.allclose(logits(ours), logits(reference), atol=1e-5)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path="tiny")
    again = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    assert torch.allclose(logits(again), logits(reference), atol=1e-5)
    reloaded = make()
    load_adapter(reloaded, tmp_path / "ours")
    assert {name: (layer.r, layer.alpha) for name, layer in lora_layers(reloaded)} == ranks


def _adapted(seed=0):
    model = make_tiny_llama(seed)
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    return model


def test_saving_refuses_empty_and_misshapen_tensors(tmp_path):
    model = _adapted()
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    layer.lora_B.weight = torch.nn.Parameter(torch.empty(0))
    with pytest.raises(ValueError, match="q_proj.lora_B.weight is empty"):
        save_adapter(model, tmp_path / "a", base_model_name_or_path="x")
    layer.lora_B.weight = torch.nn.Parameter(torch.zeros(32, 3))
    with pytest.raises(ValueError, match=r"q_proj.lora_B.weight has shape \(32, 3\), expected \(32, 2\)"):
        save_adapter(model, tmp_path / "a", base_model_name_or_path="x")
    assert not (tmp_path / "a").exists()


def test_saving_refuses_a_sharded_dtensor(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = _adapted()
        layer = dict(lora_layers(model))["model.layers.1.self_attn.q_proj"]
        mesh = init_device_mesh("cpu", (1,))
        layer.lora_A.weight = torch.nn.Parameter(distribute_tensor(layer.lora_A.weight.data, mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="sharded DTensor"):
            save_adapter(model, tmp_path / "a", base_model_name_or_path="x")
    finally:
        dist.destroy_process_group()


def test_saving_writes_config_and_weights_together(tmp_path, monkeypatch):
    """A save that fails while writing the weights leaves the previous adapter whole (old code had
    already replaced its config); a save that succeeds replaces both; no temp dirs stay behind."""
    import tunelab.adapters.peft_format as pf

    target = tmp_path / "adapter"
    save_adapter(_adapted(0), target, base_model_name_or_path="first")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    newer = _adapted(1)
    newer.model.layers[0].self_attn.q_proj.lora_B.weight.data.fill_(1.0)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pf, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(newer, target, base_model_name_or_path="second")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    monkeypatch.undo()
    save_adapter(newer, target, base_model_name_or_path="second")
    assert json.loads((target / CONFIG_NAME).read_text())["base_model_name_or_path"] == "second"
    assert load_file(str(target / WEIGHTS_NAME))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].eq(1.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

"""Issue 13 item 9: LoRA on the output head works (tied or not: merge and reload exact, peft agrees),
and a target that names nothing is a config-time error listing the linear modules (exit 2)."""

import copy
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.artifact_fixtures import make_tiny_qwen2
from tests.conftest import make_tiny_llama
from tunelab.adapters.lora import inject_lora, lora_layers, merge_lora
from tunelab.adapters.peft_format import load_adapter, save_adapter

IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 2]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("make", [lambda: make_tiny_llama(tie=True), lambda: make_tiny_qwen2(tie=False)],
                         ids=["llama-tied", "qwen2-untied"])
def test_lora_on_lm_head_merges_and_reloads_exactly(tmp_path, make):
    peft = pytest.importorskip("peft")
    base = make()
    embeddings = base.get_input_embeddings().weight.detach().clone()
    adapted = copy.deepcopy(base)
    names = inject_lora(adapted, ["q_proj", "lm_head"], r=4, alpha=8)
    assert "lm_head" in names
    gen = torch.Generator().manual_seed(1)
    for _, layer in lora_layers(adapted):
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1
    unmerged = logits(adapted)
    assert not torch.allclose(unmerged, logits(base), atol=1e-4)
    save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path="tiny")
    reloaded = make()
    load_adapter(reloaded, tmp_path / "adapter")
    assert torch.allclose(logits(reloaded), unmerged, atol=1e-6)
    assert torch.allclose(logits(peft.PeftModel.from_pretrained(make(), tmp_path / "adapter")), unmerged, atol=1e-5)
    merged = merge_lora(adapted)
    assert torch.equal(merged.get_input_embeddings().weight, embeddings)  # the tied embedding is not changed
    assert torch.allclose(logits(merged), unmerged, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(again), unmerged, atol=1e-5)
    assert torch.equal(again.get_input_embeddings().weight, embeddings)


def test_unknown_target_is_a_config_error_before_data_loads(tmp_path):
    """The data file does not even exist: the target check comes first, from the meta-device skeleton."""
    make_tiny_qwen2().save_pretrained(tmp_path / "tiny")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: {tmp_path / 'tiny'}}}\ndata: {{train: {{path: {tmp_path / 'no.jsonl'}}}}}\n"
                      f"output_dir: {tmp_path / 'run'}\nlora: {{target_modules: [qkv_proj]}}\n")
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", str(config)], capture_output=True, text=True,
                            timeout=300)
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, out
    assert "Traceback" not in out and "no.jsonl" not in out
    assert "lora.target_modules=['qkv_proj'] matches no linear layer" in out
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in out
    assert not (tmp_path / "run").exists()


def test_one_unmatched_target_beside_a_matching_one_is_an_error():
    """A typo next to a correct name (``[q_prj, v_proj]``) used to adapt only v_proj silently (exit 0)."""
    from tunelab.adapters.lora import find_target_modules
    from tunelab.errors import ConfigError

    model = make_tiny_llama()
    with pytest.raises(ConfigError, match=r"\['q_prj'\] in lora.target_modules=.*'q_proj'"):
        find_target_modules(model, ["q_prj", "v_proj"])
    with pytest.raises(ConfigError, match="q_prj"):
        inject_lora(copy.deepcopy(model), ["q_prj", "v_proj"], r=2, alpha=4)
    assert all(n.endswith(("q_proj", "v_proj")) for n in find_target_modules(model, ["q_proj", "v_proj"]))
    assert any(n.endswith("lm_head") for n in find_target_modules(model, ["re:.*_proj", "lm_head"]))

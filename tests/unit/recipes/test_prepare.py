import pytest
import torch

from tunelab.config.load import validate_config
from tunelab.errors import TunelabError
from tunelab.recipes.prepare import setup_trainable, weights_dtype
from tests.conftest import make_tiny_llama


def config(**train):
    return validate_config({"model": {"name_or_path": "x"}, "data": {"train": {"path": "x"}}, "train": train})


def test_auto_dtype_is_bf16_only_for_lora_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert weights_dtype(config(), cuda) == torch.bfloat16
    assert weights_dtype(config(), cpu) == torch.float32
    assert weights_dtype(config(method="full"), cuda) == torch.float32


def test_bf16_weights_need_lora_and_autocast():
    cfg = config(method="full")
    cfg.model.dtype = "bfloat16"
    with pytest.raises(TunelabError, match="master weights"):
        weights_dtype(cfg, torch.device("cpu"))
    cfg = config(precision="fp32")
    cfg.model.dtype = "bfloat16"
    with pytest.raises(TunelabError, match="autocast"):
        weights_dtype(cfg, torch.device("cpu"))


def test_adapters_on_a_bf16_base_are_float32():
    model = make_tiny_llama().to(torch.bfloat16)
    setup_trainable(model, config())
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}


def test_setup_trainable_honours_gradient_checkpointing_for_every_recipe():
    model = make_tiny_llama()
    setup_trainable(model, config(gradient_checkpointing=True))
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    plain = make_tiny_llama()
    setup_trainable(plain, config())
    assert not plain.is_gradient_checkpointing


def test_bf16_weights_with_auto_precision_off_cuda_are_a_config_error_naming_model_dtype():
    """precision auto is fp32 on CPU, so a bf16 base crashed at the first LoRA matmul (bf16 vs fp32) instead
    of a clear error; with train.precision bf16 (autocast) it is the fast CPU path and stays allowed."""
    cfg = config()
    cfg.model.dtype = "bfloat16"
    with pytest.raises(TunelabError, match="model.dtype: bfloat16 needs bf16 autocast.*train.precision: bf16"):
        weights_dtype(cfg, torch.device("cpu"))
    assert weights_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    assert weights_dtype(config(precision="bf16"), torch.device("cpu")) == torch.float32  # auto dtype: fp32 on CPU
    cfg = config(precision="bf16")
    cfg.model.dtype = "bfloat16"
    assert weights_dtype(cfg, torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("use_dora", [False, True])
def test_fp32_adapters_on_a_bf16_base_run_outside_autocast(use_dora):
    """Sample answers are generated outside autocast: a bf16 base with fp32 LoRA/DoRA adapters crashed there
    (bf16 vs fp32 matmul). Outside autocast the adapter now runs in fp32 and adds to the bf16 output."""
    from tunelab.adapters.lora import inject_lora, lora_layers

    model = make_tiny_llama().to(torch.bfloat16)
    inject_lora(model, "all-linear", r=4, alpha=8, use_dora=use_dora)
    for _, layer in lora_layers(model):
        layer.lora_A.float(), layer.lora_B.float()
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        if use_dora:
            layer.lora_magnitude_vector.data = layer.lora_magnitude_vector.data.float()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(input_ids=ids).logits
    assert plain.dtype == torch.bfloat16 and torch.isfinite(plain).all()
    assert torch.allclose(plain.float(), autocast.float(), atol=0.1, rtol=0.05)

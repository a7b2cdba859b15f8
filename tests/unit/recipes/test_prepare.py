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


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_bf16_weights_off_cuda_are_a_config_error_naming_model_dtype(precision):
    """A bf16 frozen base on CPU crashed at the first LoRA matmul (bf16 vs fp32) instead of a clear error."""
    cfg = config(precision=precision)
    cfg.model.dtype = "bfloat16"
    with pytest.raises(TunelabError, match="model.dtype: bfloat16 .*runs on CUDA"):
        weights_dtype(cfg, torch.device("cpu"))
    assert weights_dtype(cfg, torch.device("cuda")) == torch.bfloat16

"""DoRA invariants (arXiv:2402.09353): init is a no-op, merge/unmerge exact, the magnitude learns, the
§4.3 detached norm gives PEFT's gradients, and adapters cross between tunelab and PEFT both ways."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from tunelab.adapters.dora import row_norm
from tunelab.adapters.lora import LoRALinear, inject_lora, lora_layers, merge_lora
from tunelab.adapters.peft_format import WEIGHTS_NAME, load_adapter, read_adapter_config, save_adapter
from tests.conftest import make_tiny_llama

IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 2], [1, 40, 41, 42, 43, 44, 45, 2]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(model, seed=1):
    """Random B (so ΔW ≠ 0) and magnitudes away from ||W|| (so the direction/magnitude split matters)."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1
        layer.lora_magnitude_vector.data *= 1 + 0.2 * torch.randn(layer.out_features, generator=gen)


def test_magnitude_starts_at_the_row_norms_and_init_is_a_no_op():
    base = make_tiny_llama()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, "all-linear", r=4, alpha=8, use_dora=True)
    for name, layer in lora_layers(adapted):
        weight = base.get_submodule(name).weight
        expected = torch.sqrt((weight.double() ** 2).sum(dim=1)).float()
        assert torch.allclose(layer.lora_magnitude_vector, expected, rtol=1e-6)
    assert torch.allclose(logits(adapted), logits(base), atol=1e-6)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any(n.endswith(".lora_magnitude_vector") for n in trainable)


def test_forward_is_eq5_of_the_paper_on_one_layer():
    """W' x + b with W' = m ⊙ (W + sBA) / ||W + sBA||_c, built densely by hand."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    layer = LoRALinear(copy.deepcopy(linear), r=2, alpha=4.0, use_dora=True)
    layer.lora_B.weight.data = torch.randn(5, 2)
    layer.lora_magnitude_vector.data = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    x = torch.randn(3, 6)
    full = linear.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    dense = layer.lora_magnitude_vector[:, None] * full / full.norm(dim=1, keepdim=True)
    assert torch.allclose(layer(x), x @ dense.T + linear.bias, atol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores_the_base():
    base = make_tiny_llama()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, TARGETS, r=4, alpha=8, use_dora=True, use_rslora=True)
    randomize(adapted)
    unmerged = logits(adapted)
    assert not torch.allclose(unmerged, logits(base), atol=1e-3)
    for _, layer in lora_layers(adapted):
        layer.merge()
    assert torch.allclose(logits(adapted), unmerged, atol=1e-5)
    for name, layer in lora_layers(adapted):
        layer.unmerge()
        assert (layer.base_layer.weight - base.get_submodule(name).weight).abs().max() < 1e-6
    assert torch.allclose(logits(adapted), unmerged, atol=1e-5)
    merged = merge_lora(copy.deepcopy(adapted))
    assert not list(lora_layers(merged))
    assert torch.allclose(logits(merged), unmerged, atol=1e-5)


def _peft_dora(seed=3, dropout=0.0):
    """A PEFT DoRA model with random B and magnitudes moved away from ||W||."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, lora_dropout=dropout)
    model = peft.get_peft_model(make_tiny_llama(), config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name or "lora_magnitude" in name:
            param.data = param.data + torch.randn(param.shape, generator=gen) * 0.1
    return model


def _copy_peft_into_ours(peft_model, ours):
    own = {}
    for name, value in peft_model.state_dict().items():
        if "lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            own[key.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")] = value.clone()
    missing, unexpected = ours.load_state_dict(own, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]


def test_gradients_equal_peft_dora_including_the_magnitude():
    """The §4.3 detached norm: every adapter gradient (A, B, m) matches PEFT's DoRA on the same weights."""
    peft_model = _peft_dora()
    ours = make_tiny_llama()
    inject_lora(ours, TARGETS, r=4, alpha=8, use_dora=True)
    _copy_peft_into_ours(peft_model, ours)
    for model in (peft_model, ours):
        model(input_ids=IDS, labels=IDS).loss.backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", "").replace(".lora_magnitude_vector.weight",
              ".lora_magnitude_vector"): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs)
    magnitude = [n for n in mine if n.endswith("lora_magnitude_vector")]
    assert magnitude and all(mine[n].abs().sum() > 0 for n in magnitude)
    for name in mine:
        assert torch.allclose(mine[name], theirs[name], atol=1e-6, rtol=1e-4), name


def test_training_with_dropout_matches_peft_dora():
    """Dropout like PEFT's formulation: W x recomputed on the dropped input; same RNG → same loss."""
    peft_model = _peft_dora(dropout=0.3)
    ours = make_tiny_llama()
    inject_lora(ours, TARGETS, r=4, alpha=8, dropout=0.3, use_dora=True)
    _copy_peft_into_ours(peft_model, ours)
    losses = []
    for model in (peft_model, ours):
        model.train()
        torch.manual_seed(11)
        losses.append(model(input_ids=IDS, labels=IDS).loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    torch.manual_seed(12)
    assert not torch.allclose(ours(input_ids=IDS, labels=IDS).loss, losses[1], atol=1e-6)  # dropout did act


def test_dora_written_by_tunelab_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = make_tiny_llama()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, "all-linear", r=4, alpha=16, use_dora=True)
    randomize(adapted)
    save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path="tiny")
    assert read_adapter_config(tmp_path / "adapter")["use_dora"] is True
    keys = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    peft_model = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
    assert torch.allclose(logits(peft_model), logits(adapted), atol=1e-5)
    assert not torch.allclose(logits(adapted), logits(base), atol=1e-3)


def test_dora_written_by_peft_loads_in_tunelab(tmp_path):
    peft_model = _peft_dora()
    peft_model.save_pretrained(tmp_path / "peft")
    ours = make_tiny_llama()
    load_adapter(ours, tmp_path / "peft")
    assert all(layer.use_dora and layer.lora_magnitude_vector.requires_grad for _, layer in lora_layers(ours))
    assert torch.allclose(logits(ours), logits(peft_model), atol=1e-5)
    assert not torch.allclose(logits(ours), logits(make_tiny_llama()), atol=1e-3)


def test_row_norm_by_hand():
    weight = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert torch.equal(row_norm(weight), torch.tensor([5.0, 1.0]))
    assert torch.equal(row_norm(weight, torch.tensor([[2.0, 8.0], [0.0, 0.0]])), torch.tensor([13.0, 1.0]))


def test_a_dora_adapter_missing_a_magnitude_is_refused_and_the_model_left_alone(tmp_path):
    from safetensors.torch import save_file

    from tunelab.errors import ModelLoadError

    adapted = make_tiny_llama()
    inject_lora(adapted, TARGETS, r=4, alpha=8, use_dora=True)
    randomize(adapted)
    save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path="tiny")
    path = tmp_path / "adapter" / WEIGHTS_NAME
    state = load_file(str(path))
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"]
    save_file(state, str(path))
    ours = make_tiny_llama()
    with pytest.raises(ModelLoadError, match=r"without the magnitude of 1 of 6 modules.*layers\.1\.self_attn\.v_proj"):
        load_adapter(ours, tmp_path / "adapter")
    assert not list(lora_layers(ours))

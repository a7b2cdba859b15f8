"""model.quantize=nf4 through the SFT recipe on a tiny Llama (packing, chunked CE, activation checkpointing),
its saved run, `tunelab merge` into the dequantized base, and the config-time errors."""

import json

import pytest
import torch

from tunelab.config.load import validate_config
from tunelab.errors import TunelabError
from tests.unit.classification.helpers import tiny_base_dir

pytest.importorskip("torchao")
IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])


def raw_config(tmp_path, model_dir, **overrides):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"task": "sft", "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model_dir), "quantize": "nf4"},
           "data": {"train": {"path": str(data)}, "val_fraction": 0.25, "max_seq_len": 64, "packing": True},
           "lora": {"r": 4, "alpha": 8, "use_dora": True},
           "train": {"method": "lora", "max_steps": 3, "batch_size": 2, "grad_accum": 1, "lr": 1e-2, "threads": 1,
                     "gradient_checkpointing": True, "chunked_ce": True, "ce_chunk_size": 16},
           "eval": {"before_training": False, "sample_questions": 0}}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        raw.setdefault(section, {})[field] = value
    return raw


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory, smollm2_tokenizer):
    return tiny_base_dir("decoder", tmp_path_factory.mktemp("dec"), smollm2_tokenizer)


def test_qlora_dora_run_trains_saves_reloads_and_merges_into_the_dequantized_base(tmp_path, decoder_dir):
    from rich.console import Console
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from tunelab.cli.app import app
    from tunelab.models.run import load_run
    from tunelab.quant.nf4 import NF4Linear
    from tunelab.recipes.sft import train

    results = train(validate_config(raw_config(tmp_path, decoder_dir)), console=Console(quiet=True))
    assert all(torch.isfinite(torch.tensor(v)) for v in [results["held_out_after"]["loss"]])
    info = json.loads((tmp_path / "run" / "tunelab.json").read_text())
    assert info["base_quantization"] == {"format": "nf4", "block_size": 64, "dtype": "float32"}
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True

    ours, _, _ = load_run(tmp_path / "run")  # rebuilt on the NF4 base it was trained on
    assert isinstance(ours.model.layers[0].mlp.down_proj.base_layer, NF4Linear)
    assert ours.model.layers[0].mlp.down_proj.lora_B.weight.abs().sum() > 0  # training moved the adapter
    with torch.no_grad():
        on_quantized = ours(input_ids=IDS).logits
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, on_quantized, atol=1e-4)
    meta = json.loads((tmp_path / "merged" / "tunelab.json").read_text())
    assert meta["base_quantization"]["format"] == "nf4" and "dequantized" in meta["merged_into"]
    assert merged.config.tunelab_merged_into_dequantized_base["format"] == "nf4"


@pytest.mark.parametrize(("overrides", "match"), [
    ({"train.method": "full"}, "model.quantize=nf4 .*needs train.method=lora"),
    ({"distributed.strategy": "fsdp"}, "model.quantize=nf4 is not supported with distributed.strategy=fsdp"),
    ({"distributed.strategy": "ddp"}, "model.quantize=nf4 is not supported with distributed.strategy=ddp"),
    ({"train.compile": True}, "model.quantize=nf4 is not supported with train.compile"),
])
def test_quantize_combinations_the_backend_cannot_handle_are_config_errors(tmp_path, overrides, match):
    with pytest.raises(TunelabError, match=match):
        validate_config(raw_config(tmp_path, "some/model", **overrides))


def test_quantize_under_several_processes_is_an_error_naming_model_quantize(monkeypatch):
    from tests.conftest import make_tiny_llama
    from tunelab.recipes.prepare import quantize_base

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TunelabError, match="model.quantize=nf4 is not supported with several processes"):
        quantize_base(make_tiny_llama(), "nf4")


def test_before_training_measures_the_nf4_base_training_starts_from(tmp_path, decoder_dir):
    """'held_out_before' of a QLoRA run is the quantized base's loss (what the adapter trains on and merge
    produces at init), not the full-precision checkpoint's (failed before: it was measured before quantizing)."""
    from rich.console import Console

    from tunelab.recipes.sft import train

    def before_and_after(tag, **overrides):
        raw = raw_config(tmp_path / tag, decoder_dir, **{"eval.before_training": True, "train.max_steps": 1,
                                                          "train.lr": 1e-12, **overrides})
        results = train(validate_config(raw), console=Console(quiet=True))
        return results["held_out_before"]["loss"], results["held_out_after"]["loss"]

    for tag in ("a", "b"):
        (tmp_path / tag).mkdir()
    nf4_before, nf4_after = before_and_after("a")
    plain_before, _ = before_and_after("b", **{"model.quantize": "none"})
    assert nf4_after == pytest.approx(nf4_before, abs=1e-6)  # lr 1e-12: after ≈ the starting model
    assert abs(nf4_before - plain_before) > 1e-4  # and the starting model is the NF4 base


def test_dpo_precomputed_reference_is_the_nf4_base_so_step_one_is_ln2(tmp_path, decoder_dir):
    """A precomputed DPO reference under QLoRA comes from the quantized base, so the policy at init equals
    the reference and the first step's loss is ln 2 (failed before: logps came from the unquantized model)."""
    import math

    from rich.console import Console

    from tunelab.recipes.dpo import train

    pairs = [{"prompt": f"what is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": f"maybe {i + 3}, not sure."}
             for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    raw = {"task": "dpo", "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(decoder_dir), "quantize": "nf4"},
           "data": {"train": {"path": str(data)}, "max_seq_len": 64}, "lora": {"r": 4, "alpha": 8},
           "preference": {"reference": "precomputed"},
           "train": {"method": "lora", "max_steps": 1, "batch_size": 2, "grad_accum": 1, "lr": 1e-2, "threads": 1},
           "eval": {"before_training": False, "sample_questions": 0}}
    train(validate_config(raw), console=Console(quiet=True))
    step = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line))
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_nproc_with_a_quantized_base_is_refused_before_torchrun_starts(tmp_path, monkeypatch):
    """`--nproc 2` with model.quantize=nf4 was refused only inside each rank, after loading data, followed by
    torchrun's traceback; now the CLI refuses before launching."""
    import yaml
    from typer.testing import CliRunner

    from tunelab.cli.app import app
    from tunelab.training import distributed

    monkeypatch.setattr(distributed, "launch_local", lambda *a, **k: pytest.fail("torchrun was started"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw_config(tmp_path, "some/model")))
    result = CliRunner().invoke(app, ["train", str(config), "--nproc", "2"])
    assert isinstance(result.exception, TunelabError) and "model.quantize" in str(result.exception)

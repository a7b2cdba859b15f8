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


def test_output_dir_with_user_files_is_refused_even_with_overwrite(tmp_path):
    from tunelab.recipes.prepare import check_output_dir

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.yaml").write_text("my: config")
    for overwrite in (False, True):
        with pytest.raises(TunelabError) as err:
            check_output_dir(out, resume=False, overwrite=overwrite)
        message = str(err.value)
        assert f"output_dir {out} is not empty and is not a tunelab run" in message
        assert "config.yaml, notes.txt" in message and f"output_dir={out / 'run'}" in message
    assert (out / "notes.txt").read_text() == "keep me" and (out / "config.yaml").read_text() == "my: config"


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    from tunelab.recipes.prepare import check_output_dir

    (tmp_path / "out").write_text("")
    with pytest.raises(TunelabError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "out", resume=False, overwrite=False)


def test_empty_missing_or_earlier_run_output_dirs_are_accepted(tmp_path):
    from tunelab.recipes.prepare import check_output_dir

    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", resume=False, overwrite=False) is None
    assert check_output_dir(tmp_path / "new", resume=False, overwrite=False) is None
    interrupted = tmp_path / "interrupted"  # stopped before its first checkpoint: restarted as before
    interrupted.mkdir()
    (interrupted / "metrics.jsonl").write_text("")
    (interrupted / "config.yaml").write_text("")
    assert check_output_dir(interrupted, resume=False, overwrite=False) is None
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "tunelab.json").write_text("{}")
    (finished / "notes.txt").write_text("")
    with pytest.raises(TunelabError, match="already holds a run"):
        check_output_dir(finished, resume=False, overwrite=False)
    assert check_output_dir(finished, resume=False, overwrite=True) is None

"""Bad input reaches the user as one clear message (exit 2), never a traceback."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def tunelab(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def config(tmp_path, data_path, extra=""):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{name_or_path: smollm2-135m-instruct}}\ndata: {{train: {{path: {data_path}}}}}\n"
                    f"output_dir: {tmp_path / 'run'}\n{extra}")
    return path


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    out = " ".join((result.stdout + result.stderr).split())
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, (needle, out)


def test_unknown_key_with_suggestion(tmp_path):
    result = tunelab("config", "show", str(config(tmp_path, "d.jsonl")), "train.learning_rate=1e-4", cwd=tmp_path)
    assert_user_error(result, "train.learning_rate", "train.lr")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    assert_user_error(tunelab("data", "inspect", str(config(tmp_path, data)), cwd=tmp_path), "d.jsonl:2")


def test_empty_data_file_says_it_has_no_records(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    assert_user_error(tunelab("data", "inspect", str(config(tmp_path, data)), cwd=tmp_path),
                      f"{data}: the file has no records")


def test_record_missing_fields_names_record_and_fields(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b", "system": "s"}\n{"instruction": "c"}\n')
    result = tunelab("data", "inspect", str(config(tmp_path, data)), cwd=tmp_path)
    assert_user_error(result, "d.jsonl record #2", "output", "record has ['instruction']")


def test_empty_after_filtering_says_why(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 100, "completion": "ok"}) + "\n")
    result = tunelab("train", str(config(tmp_path, data, "data: {train: {path: " + str(data) + "}, max_seq_len: 16}\n")),
                     cwd=tmp_path)
    assert_user_error(result, "no training examples left", "no supervised tokens after truncation")


def test_existing_run_is_not_clobbered(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step-000001").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-000001" / "state.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert_user_error(tunelab("train", str(config(tmp_path, data)), cwd=tmp_path), "already holds a run")
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "state.json").is_file()


def test_a_directory_of_user_files_is_not_written_into(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "README.md").write_text("my notes")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    result = tunelab("train", str(config(tmp_path, data)), "--overwrite", cwd=tmp_path)
    assert_user_error(result, f"output_dir {tmp_path / 'run'} is not empty and is not a tunelab run", "README.md")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["README.md"]


def test_a_failed_overwrite_keeps_the_old_run(tmp_path):
    """--overwrite with bad input must fail before anything of the old run is deleted."""
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    result = tunelab("train", str(config(tmp_path, tmp_path / "missing.jsonl")), "--overwrite", cwd=tmp_path)
    assert_user_error(result, "missing.jsonl")
    assert (ckpt / "state.json").is_file()


def test_clear_checkpoints_removes_checkpoints_and_half_written_leftovers(tmp_path):
    from tunelab.training.checkpoint import clear_checkpoints

    root = tmp_path / "checkpoints"
    for name in ("step-000002", "step-000004", ".tmp-step-000006-abc"):
        (root / name).mkdir(parents=True)
        (root / name / "state.json").write_text("{}")
    assert clear_checkpoints(tmp_path) == 2
    assert list(root.iterdir()) == []


def test_a_missing_local_model_path_is_named_not_sent_to_the_hub(tmp_path):
    from tunelab.errors import ModelLoadError
    from tunelab.models.loading import resolve_model_path

    with pytest.raises(ModelLoadError, match="was not found"):
        resolve_model_path(str(tmp_path / "no-such-model"))


def test_validation_identical_to_train_is_refused():
    from tunelab.config.load import validate_config
    from tunelab.errors import ConfigError

    raw = {"model": {"name_or_path": "x"}, "data": {"train": {"path": "builtin:chatterbot", "name": "ai"},
                                                    "validation": {"path": "builtin:chatterbot", "name": "ai"}}}
    with pytest.raises(ConfigError, match="data.validation.split"):
        validate_config(raw)
    raw["data"]["validation"]["split"] = "validation"
    assert validate_config(raw).data.validation.split == "validation"

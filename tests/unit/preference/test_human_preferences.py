"""The human-preference applications (issue 18, item 4): builtin:summeval-pairs, the shipped reward /
DPO / PPO configs on qa-feedback and SummEval, and the held-out comparison against the length heuristic.
All new (the builtin, configs and bench script did not exist): every test fails on the old code."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tunelab.config.load import load_config
from tunelab.data.builtin import load_builtin
from tunelab.errors import DataError

ROOT = Path(__file__).resolve().parents[3]
ASSETS = ROOT / "src" / "tunelab" / "data" / "assets" / "summeval"


def test_summeval_pairs_split_by_article_deterministic_and_rated_apart():
    from tunelab.data.builtin_summeval import LEAD_WORDS, MIN_GAP, overall

    train, held = load_builtin("summeval-pairs", None, "train"), load_builtin("summeval-pairs", None, "validation")
    assert train == load_builtin("summeval-pairs", None, "train")
    assert not {r["doc_id"] for r in train} & {r["doc_id"] for r in held}
    assert 20 <= len({r["doc_id"] for r in held}) <= 40 and len({r["doc_id"] for r in train}) >= 60
    articles = {json.loads(line)["doc_id"]: json.loads(line) for line in gzip.open(ASSETS / "summeval.jsonl.gz", "rt")}
    assert len(articles) == 100 and len({r["doc_id"] for r in train + held}) <= 100
    for record in train[:50] + held[:50]:
        summaries = {s["system"]: s for s in articles[record["doc_id"]]["summaries"]}
        better, worse = summaries[record["chosen_system"]], summaries[record["rejected_system"]]
        assert record["chosen"] == better["summary"] and record["rejected"] == worse["summary"]
        assert overall(better) - overall(worse) >= MIN_GAP and record["margin"] == pytest.approx(
            overall(better) - overall(worse), abs=1e-4)
        lead = record["prompt"].removeprefix("Summarize the news article:\n").removesuffix("\nSummary:")
        assert lead.split() == articles[record["doc_id"]]["article"].split()[:LEAD_WORDS]


def test_summeval_disjoint_pairs_use_each_summary_once_and_the_subsets_are_checked():
    disjoint = load_builtin("summeval-pairs", "disjoint", "validation")
    seen = [(r["doc_id"], s) for r in disjoint for s in (r["chosen_system"], r["rejected_system"])]
    assert len(seen) == len(set(seen)) and len(disjoint) >= 80
    every = {(r["doc_id"], r["chosen_system"], r["rejected_system"]) for r in load_builtin("summeval-pairs", "all",
                                                                                            "validation")}
    assert {(r["doc_id"], r["chosen_system"], r["rejected_system"]) for r in disjoint} <= every
    with pytest.raises(DataError, match="subsets 'all', 'disjoint'"):
        load_builtin("summeval-pairs", "strict", "train")
    with pytest.raises(DataError, match="splits 'train' and 'validation'"):
        load_builtin("summeval-pairs", None, "test")


def test_summeval_is_vendored_small_with_its_licences():
    assert (ASSETS / "summeval.jsonl.gz").stat().st_size <= 2 * 1024 * 1024
    assert "MIT License" in (ASSETS / "LICENSE").read_text() and (ASSETS / "LICENSE.BARTScore").is_file()
    assert "Fabbri" in (ASSETS / "README.md").read_text()


def test_the_reward_configs_hold_out_by_group_and_the_ppo_reward_is_the_qa_feedback_reward_run():
    qa = load_config(ROOT / "configs" / "reward" / "qa-feedback-minilm.yaml")
    assert qa.task == "reward" and qa.data.train.path == qa.data.validation.path == "builtin:qa-feedback"
    assert (qa.data.train.split, qa.data.validation.split, qa.data.validation.name) == (
        "train", "validation", "one-per-question")
    summ = load_config(ROOT / "configs" / "reward" / "summeval-minilm.yaml")
    assert summ.data.train.path == "builtin:summeval-pairs" and summ.data.validation.name == "disjoint"
    ppo = load_config(ROOT / "configs" / "ppo" / "qa-feedback-ppo.yaml")
    assert ppo.task == "ppo" and [r.run_dir for r in ppo.rl.rewards] == [qa.output_dir]
    assert ppo.data.train.path == "builtin:qa-feedback" and ppo.data.validation.split == "validation"


def test_the_dpo_config_is_the_kto_config_with_the_paired_loss():
    dpo = load_config(ROOT / "configs" / "dpo" / "qa-feedback-dpo.yaml")
    kto = load_config(ROOT / "configs" / "kto" / "qa-feedback-kto.yaml")
    assert dpo.preference.loss == "dpo" and kto.preference.loss == "kto"
    assert dpo.model == kto.model and dpo.lora == kto.lora
    for key in ("train", "validation", "max_examples", "max_validation_examples", "max_seq_len"):
        assert getattr(dpo.data, key) == getattr(kto.data, key), key
    assert (dpo.train.lr, dpo.train.epochs, dpo.train.schedule) == (kto.train.lr, kto.train.epochs, kto.train.schedule)
    assert dpo.train.batch_size * 2 == kto.train.batch_size  # pairs vs examples: the same answers per step


def test_the_length_heuristic_and_intervals_by_hand():
    from bench.preference_heldout import cluster_bootstrap, length_choice, sign_test, summarize

    assert (length_choice("a b c", "a"), length_choice("a", "a b"), length_choice("a b", "c d")) == (1.0, 0.0, 0.5)
    # 3 of 4 right: Wilson 95% for p = 0.75, n = 4 is (0.301, 0.954) (Wilson 1927 formula, z = 1.96)
    out = summarize([1.0, 1.0, 0.0, 1.0], ["q1", "q1", "q2", "q3"])
    assert out["accuracy"] == 0.75 and out["wilson95"] == pytest.approx([0.3006, 0.9544], abs=1e-3)
    assert out["groups"] == 3 and 0.0 <= out["cluster_bootstrap95"][0] <= 0.75 <= out["cluster_bootstrap95"][1]
    assert cluster_bootstrap([1.0, 1.0], ["a", "b"]) == (1.0, 1.0)
    assert sign_test(5, 0) == pytest.approx(2 / 32) and sign_test(3, 3) == 1.0

"""builtin:medquad and builtin:pubmedqa (issue 18, medical): the splits' rules, determinism, errors,
the vendored files and licences, and the shipped configs/medical/*.yaml. All new: neither source
existed before (every test fails on the old code)."""

import random
from collections import Counter
from pathlib import Path

import pytest

from tunelab.config.load import load_config
from tunelab.data.builtin import load_builtin
from tunelab.data.builtin_medquad import SOURCES, document_groups, document_key, read_pairs
from tunelab.data.formats import detect_format
from tunelab.errors import DataError

ROOT = Path(__file__).resolve().parents[3]
ASSETS = ROOT / "src" / "tunelab" / "data" / "assets"
MEDQUAD_SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def medquad():
    return {split: load_builtin("medquad", None, split) for split in MEDQUAD_SPLITS}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_medquad_splits_share_no_document_focus_or_question(medquad):
    keys = {split: [(f"{r['source']}/{r['document']}", r["focus"].strip().lower(), _norm(r["messages"][0]["content"]))
                    for r in records] for split, records in medquad.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        for k in range(3):  # document, focus, question text
            assert not {x[k] for x in keys[a]} & {x[k] for x in keys[b]}, (a, b, k)
    num_pairs = len(read_pairs())
    assert sum(len(r) for r in medquad.values()) == num_pairs  # every vendored pair in exactly one split
    shares = {s: len(r) / num_pairs for s, r in medquad.items()}
    assert 0.05 < shares["validation"] < 0.15 and 0.05 < shares["test"] < 0.15, shares


def test_medquad_is_deterministic_and_in_pair_hash_order(medquad):
    assert load_builtin("medquad", None, "validation") == medquad["validation"]
    first = medquad["validation"][:64]  # what the shipped SFT config evaluates on
    assert len({r["group"] for r in first}) >= 40  # many documents, not a few groups' pairs
    assert len({r["source"] for r in medquad["train"][:300]}) >= 5  # and every kind of source
    assert len({r["group"] for r in medquad["validation"][:3]}) == 3  # the side-by-side samples differ


def test_medquad_records_are_user_assistant_conversations(medquad):
    record = medquad["train"][0]
    assert detect_format(record, {}, where="medquad") == "messages"
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert all(0 < len(r["messages"][1]["content"]) <= 1500 for r in medquad["test"])


def test_document_groups_link_by_document_focus_and_question_whatever_the_order():
    pairs = [
        {"source": "A", "document": "1", "focus": "X", "question": "q1"},
        {"source": "A", "document": "1", "focus": "X", "question": "q2"},
        {"source": "B", "document": "1", "focus": "x ", "question": "q3"},   # same focus as A/1 (case, space)
        {"source": "B", "document": "2", "focus": "Y", "question": "Q3"},    # same question as B/1
        {"source": "C", "document": "9", "focus": "Z", "question": "q9"},    # alone
        {"source": "C", "document": "8", "focus": "W", "question": "q1"},    # same question as A/1
    ]
    groups = document_groups(pairs)
    assert groups == ["A/1", "A/1", "A/1", "A/1", "C/9", "A/1"]
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    shuffled = document_groups([pairs[i] for i in order])
    assert {document_key(pairs[i]): g for i, g in zip(order, shuffled)} == {document_key(p): g
                                                                           for p, g in zip(pairs, groups)}


def test_medquad_source_subset_keeps_the_whole_set_split(medquad):
    sub = load_builtin("medquad", "gard, NINDS", "validation")
    assert sub and {r["source"] for r in sub} == {"GARD", "NINDS"}
    assert sub == [r for r in medquad["validation"] if r["source"] in ("GARD", "NINDS")]
    assert set(SOURCES) == {r["source"] for r in medquad["train"]}


@pytest.mark.parametrize("subset, split, message", [
    (None, "dev", "splits \\['train', 'validation', 'test'\\], not 'dev'"),
    ("GARD,WebMD", "train", "no source \\['WebMD'\\]"),
    (",", "train", "comma-separated list of CancerGov"),
])
def test_medquad_errors_name_the_bad_value(subset, split, message):
    with pytest.raises(DataError, match=message):
        load_builtin("medquad", subset, split)


def test_pubmedqa_split_is_stratified_disjoint_and_deterministic():
    train, test = load_builtin("pubmedqa", None, "train"), load_builtin("pubmedqa", None, "test")
    assert Counter(r["label"] for r in test) == {"yes": 166, "no": 101, "maybe": 33}  # module docstring
    assert Counter(r["label"] for r in train) == {"yes": 386, "no": 237, "maybe": 77}
    assert not {r["pmid"] for r in train} & {r["pmid"] for r in test}
    assert test == load_builtin("pubmedqa", None, "test")
    for r in train + test:  # the classifier input holds question + abstract, never the conclusion
        assert r["question"]
        assert r["context"] and r["long_answer"] and r["long_answer"] not in r["context"]


@pytest.mark.parametrize("subset, split, message", [
    (None, "validation", "splits 'train' and 'test', not 'validation'"),
    ("pqa-a", "train", "no subsets"),
])
def test_pubmedqa_errors_name_the_bad_value(subset, split, message):
    with pytest.raises(DataError, match=message):
        load_builtin("pubmedqa", subset, split)


@pytest.mark.parametrize("folder", ["medquad", "pubmedqa"])
def test_vendored_files_carry_licence_and_attribution(folder):
    files = {p.name for p in (ASSETS / folder).iterdir()}
    assert {"LICENSE", "README.md"} <= files
    assert "Attribution" in (ASSETS / folder / "README.md").read_text()
    size = sum(p.stat().st_size for p in (ASSETS / folder).iterdir())
    assert size < 3_500_000  # the medical sets stay within the repository's 4 MB budget together


def test_medquad_sft_config():
    config = load_config(ROOT / "configs" / "medical" / "medquad-sft.yaml")
    data = config.data
    assert config.task == "sft" and config.train.method == "lora" and config.train.threads == 2
    assert (data.train.path, data.train.split, data.validation.path, data.validation.split) == (
        "builtin:medquad", "train", "builtin:medquad", "validation")
    assert config.eval.before_training and config.eval.sample_questions > 0  # before/after + side by side
    assert data.max_validation_examples and data.max_examples


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "medical").glob("pubmedqa-*.yaml")), ids=lambda p: p.name)
def test_pubmedqa_classification_configs(path):
    config = load_config(path)
    cc = config.classification
    assert config.task == "classification" and config.train.threads == 2
    assert config.train.metric_for_best == "macro_f1" and config.data.val_fraction > 0
    assert config.data.train.path == "builtin:pubmedqa" and config.data.train.split == "train"
    assert cc.labels == ["yes", "no", "maybe"]  # strings: unquoted yes/no would be YAML booleans
    record = load_builtin("pubmedqa", None, "test")[0]
    assert {cc.text_field, cc.text_pair_field, cc.label_field} <= set(record)
    assert "long_answer" not in (cc.text_field, cc.text_pair_field)

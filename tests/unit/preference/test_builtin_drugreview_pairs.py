"""builtin:drugreview-pairs: the pairing rule, independence of the disjoint subset, the split."""

from collections import Counter

import pytest

from tunelab.data.builtin import load_builtin
from tunelab.data.builtin_drugreview_pairs import clearly_more_useful
from tunelab.errors import DataError


def test_rule():
    assert clearly_more_useful(10, 5) and clearly_more_useful(6, 1)
    assert not clearly_more_useful(9, 5) and not clearly_more_useful(4, 0) and not clearly_more_useful(5, 5)


@pytest.mark.parametrize("subset", ["disjoint", "all"])
def test_every_pair_follows_the_rule_within_one_condition(subset):
    for split in ("train", "test"):
        records = load_builtin("drugreview-pairs", subset, split)
        assert records and all(clearly_more_useful(r["chosen_useful"], r["rejected_useful"]) for r in records)
        assert all(r["condition"] in r["prompt"] for r in records)


def test_disjoint_pairs_are_independent_and_splits_share_no_review():
    train = load_builtin("drugreview-pairs", None, "train")
    test = load_builtin("drugreview-pairs", "disjoint", "test")
    assert (len(train), len(test)) == (227, 123)  # counts stated in the module docstring
    for records in (train, test):
        texts = Counter(t for r in records for t in (r["chosen"], r["rejected"]))
        assert max(texts.values()) == 1
    train_texts = {t for r in train for t in (r["chosen"], r["rejected"])}
    assert not train_texts & {t for r in test for t in (r["chosen"], r["rejected"])}
    assert train == load_builtin("drugreview-pairs", None, "train")  # deterministic
    assert "&#039;" not in "".join(r["chosen"] for r in train)


def test_unknown_split_or_subset():
    with pytest.raises(DataError, match="splits"):
        load_builtin("drugreview-pairs", None, "validation")
    with pytest.raises(DataError, match="satisfaction-all"):
        load_builtin("drugreview-pairs", "some", "train")


def test_satisfaction_pairs_put_the_satisfied_patient_first():
    for split, expected in (("train", (128, 3252)), ("test", (69, 1198))):  # counts in the module docstring
        disjoint = load_builtin("drugreview-pairs", "satisfaction", split)
        every = load_builtin("drugreview-pairs", "satisfaction-all", split)
        assert (len(disjoint), len(every)) == expected
        for records in (disjoint, every):
            assert all(r["chosen_rating"] == "positive" and r["rejected_rating"] == "negative" for r in records)
            assert all(r["condition"] in r["prompt"] for r in records)
        texts = Counter(t for r in disjoint for t in (r["chosen"], r["rejected"]))
        assert max(texts.values()) == 1

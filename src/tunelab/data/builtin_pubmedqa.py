"""``builtin:pubmedqa``: yes/no/maybe answers to research questions from their PubMed abstracts.

Source: PubMedQA PQA-L (Jin et al. 2019, "PubMedQA: A Dataset for Biomedical Research Question
Answering", EMNLP; MIT), vendored whole in ``tunelab/data/assets/pubmedqa/`` with its LICENSE and
a README carrying the attribution: 1,000 expert-labelled questions (yes 552 / no 338 / maybe 110),
each the title of a PubMed article turned into a question, with the article's abstract minus its
conclusion as context.

Records: ``{"question", "context", "label", "pmid", "long_answer", "year", "meshes"}``: ``context``
is the abstract's sections as ``"SECTION: text"`` lines (e.g. ``BACKGROUND: ...``), ``label`` the
expert's ``final_decision`` (``yes``, ``no`` or ``maybe``), ``long_answer`` the abstract's own
conclusion (it states the answer: keep it out of a classifier's input). No subsets.

Split by PMID, deterministic and stratified: within each label, the records sorted by the SHA-256
of their PMID; the first 30% (rounded) are ``test`` (300: yes 166, no 101, maybe 33), the rest
``train`` (700: yes 386, no 237, maybe 77). This is tunelab's split, not the PubMedQA authors'
(their 500-question test set is not part of the released PQA-L file). Hold out a validation set
from train with ``data.val_fraction`` (stratified for classification).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

from tunelab.data.builtin import vendored_request

DATA_FILE = Path(__file__).parent / "assets" / "pubmedqa" / "pubmedqa_pqal.jsonl.gz"
LABELS = ("yes", "no", "maybe")
TEST_FRACTION = 0.3


def load_pubmedqa(subset: str | None, split: str) -> list[dict[str, Any]]:
    """Labelled question + abstract records of ``split`` (``train`` or ``test``), in PMID order.

    Raises:
        DataError: a subset was given (there are none), an unknown split, or the vendored file is missing.
    """
    vendored_request("pubmedqa", split, ("train", "test"), DATA_FILE, subset)
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    test = set()
    for label in LABELS:
        pmids = sorted((i["pmid"] for i in items if i["final_decision"] == label),
                       key=lambda p: hashlib.sha256(p.encode("utf-8")).digest())
        test.update(pmids[: round(TEST_FRACTION * len(pmids))])
    return [_record(i) for i in items if (i["pmid"] in test) == (split == "test")]


def _record(item: dict[str, Any]) -> dict[str, Any]:
    sections = [f"{label}: {text.strip()}" if label else text.strip()
                for label, text in zip(item["context_labels"], item["contexts"])]
    return {"question": item["question"].strip(), "context": "\n".join(sections), "label": item["final_decision"],
            "pmid": item["pmid"], "long_answer": item["long_answer"], "year": item["year"],
            "meshes": item["meshes"]}

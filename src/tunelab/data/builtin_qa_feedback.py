"""``builtin:qa-feedback``: human pairwise preferences between answers to the same question.

Source: the qa-feedback dev set of FineGrainedRLHF (Wu et al. 2023, arXiv:2306.01693; Apache-2.0),
vendored in ``tunelab/data/assets/qa_feedback/`` (its LICENSE and README with the attribution): 500
ASQA questions, four sampled answers each, and six human judgements per question for the answer
pairs 1v2, 1v3, 1v4, 2v3, 2v4, 3v4 (1 = the first is better, 2 = the second, 0 = tie).

Records: every strictly preferred pair (ties dropped, and pairs whose two answers are the same
text): ``{"prompt": question, "chosen": better answer, "rejected": worse answer, "question_id"}``
(2,616 pairs before the identical-text filter). ``name`` (subset): ``strict`` (default: every such
pair, so a question's pairs share answers) or ``one-per-question`` (only the first strict pair of each
question in the order 1v2, 1v3, ..., 3v4: pairs share nothing, so a binomial interval on held-out
pairwise accuracy is valid).

Split by question, deterministic: a question is held out (``validation``, about 15%) when the first
byte of the SHA-256 of its lower-cased text maps below 15/100, as for ``builtin:chatterbot``, so no
held-out question (with any of its answers) appears in ``train``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from tunelab.data.builtin import _holdout
from tunelab.data.builtin import vendored_request

DATA_FILE = Path(__file__).parent / "assets" / "qa_feedback" / "qa_feedback_dev.jsonl.gz"
PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))  # the order of the `preference` list


def load_qa_feedback(subset: str | None, split: str) -> list[dict[str, Any]]:
    """Preference pairs of one split (see the module docstring).

    Raises:
        DataError: unknown split or subset, or the vendored file is missing.
    """
    subset = vendored_request("qa-feedback", split, ("train", "validation"), DATA_FILE, subset,
                              ("strict", "one-per-question"))
    records = []
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as f:
        for qid, line in enumerate(f):
            item = json.loads(line)
            if _holdout(item["question"]) != (split == "validation"):
                continue
            answers = [a.strip() for a in item["answers"]]
            for (i, j), vote in zip(PAIRS, item["preference"]):
                if vote not in (1, 2) or answers[i] == answers[j]:
                    continue
                better, worse = (i, j) if vote == 1 else (j, i)
                records.append({"prompt": item["question"], "chosen": answers[better], "rejected": answers[worse],
                                "question_id": qid})
                if subset == "one-per-question":
                    break
    return records

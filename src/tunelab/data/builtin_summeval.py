"""``builtin:summeval-pairs``: expert preferences between summaries of the same news article.

Source: SummEval (Fabbri et al. 2021, arXiv:2007.12626; annotations MIT), vendored in
``tunelab/data/assets/summeval/`` with its licences and attribution: 100 CNN/DailyMail articles, 16
system summaries each, every summary rated 1–5 by three experts for coherence, consistency, fluency
and relevance (the file holds the experts' mean per dimension).

Pairs: a summary's ``overall`` score is the mean of its four ratings; two summaries of the same
article whose overall scores differ by at least :data:`MIN_GAP` (1 point) form a pair, the higher
rated one ``chosen``. Records: ``{"prompt", "chosen", "rejected", "margin" (overall gap), "doc_id",
"chosen_system", "rejected_system"}``. The prompt is ``"Summarize the news article:\\n" + lead +
"\\nSummary:"`` where the lead is the article's first :data:`LEAD_WORDS` whitespace-separated words
(a deterministic cut: the preference pipeline would otherwise cut a long prompt from the left, keeping
the article's end, while CNN/DailyMail summaries draw mostly on its start).

``name`` (subset): ``all`` (default: every pair with the gap, about 2,700; an article's pairs share
summaries) or ``disjoint`` (per article, summaries sorted by overall score and paired best with worst,
second best with second worst, ... while the gap holds: no summary in two pairs; pairs of one article
still share its lead, so a binomial interval is somewhat optimistic).

Split by article, deterministic: an article is held out (``validation``) when the first byte of the
SHA-256 of its ``doc_id`` maps below :data:`VALIDATION_PERCENT` /100 (about 30 of the 100 articles:
more than the 15% of other built-ins, because the unit of independence here is the article).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

DATA_FILE = Path(__file__).parent / "assets" / "summeval" / "summeval.jsonl.gz"
MIN_GAP = 1.0
LEAD_WORDS = 120
VALIDATION_PERCENT = 30
SUBSETS = ("all", "disjoint")


def load_summeval_pairs(subset: str | None, split: str) -> list[dict[str, Any]]:
    """Preference pairs of one split (see the module docstring).

    Raises:
        DataError: unknown split or subset, or the vendored file is missing.
    """
    if split not in ("train", "validation"):
        raise DataError(f"builtin:summeval-pairs has splits 'train' and 'validation', not '{split}'")
    subset = subset or "all"
    if subset not in SUBSETS:
        raise DataError(f"builtin:summeval-pairs has the subsets {', '.join(map(repr, SUBSETS))}, not '{subset}'")
    if not DATA_FILE.is_file():
        raise DataError(f"builtin:summeval-pairs: {DATA_FILE} is missing (reinstall tunelab)")
    records = []
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            article = json.loads(line)
            if held_out(article["doc_id"]) != (split == "validation"):
                continue
            prompt = "Summarize the news article:\n" + " ".join(article["article"].split()[:LEAD_WORDS]) + "\nSummary:"
            for better, worse in article_pairs(article["summaries"], subset):
                records.append({"prompt": prompt, "chosen": better["summary"], "rejected": worse["summary"],
                                "margin": round(overall(better) - overall(worse), 4), "doc_id": article["doc_id"],
                                "chosen_system": better["system"], "rejected_system": worse["system"]})
    return records


def overall(summary: dict[str, Any]) -> float:
    """Mean of the four expert ratings (coherence, consistency, fluency, relevance), 1–5."""
    scores = summary["scores"]
    return sum(scores[k] for k in ("coherence", "consistency", "fluency", "relevance")) / 4


def article_pairs(summaries: list[dict[str, Any]], subset: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(better, worse) summary pairs of one article with an overall gap of at least :data:`MIN_GAP`.

    Identical summary texts never pair. ``all``: every such pair, in the file's order; ``disjoint``:
    best with worst, second best with second worst, ... (stable sort by score), stopping at the first
    pair below the gap (the gaps only shrink inward).
    """
    if subset == "all":
        pairs = []
        for a, b in itertools.combinations(summaries, 2):
            if abs(overall(a) - overall(b)) >= MIN_GAP and a["summary"].strip() != b["summary"].strip():
                pairs.append((a, b) if overall(a) > overall(b) else (b, a))
        return pairs
    ranked = sorted(summaries, key=overall, reverse=True)
    pairs = []
    for i in range(len(ranked) // 2):
        better, worse = ranked[i], ranked[-1 - i]
        if overall(better) - overall(worse) < MIN_GAP:
            break
        if better["summary"].strip() != worse["summary"].strip():
            pairs.append((better, worse))
    return pairs


def held_out(doc_id: str) -> bool:
    """Whether the article ``doc_id`` belongs to the ``validation`` split."""
    return hashlib.sha256(doc_id.encode("utf-8")).digest()[0] * 100 // 256 < VALIDATION_PERCENT

"""``builtin:medquad``: consumer-health questions answered by NIH web sites, held out by document.

Source: MedQuAD (Ben Abacha & Demner-Fushman 2019, "A question-entailment approach to question
answering", BMC Bioinformatics 20:511; CC BY 4.0), vendored in ``tunelab/data/assets/medquad/``
with its LICENSE and a README carrying the attribution. The vendored file is a deterministic subset
of the 16,407 answered pairs: answers with whitespace normalised, only those of at most 1,500
characters (about 350 SmolLM2 tokens, so a pair fits a 512-token sequence whole), exact duplicate
pairs removed (``scripts/vendor_medical.py`` builds it; the count is in the asset README).

Records: ``{"messages": [user question, assistant answer], "source", "document", "focus", "qtype",
"group"}``. ``name`` (subset): a comma-separated list of sources (``CancerGov, GARD, GHR,
MPlusHealthTopics, NIDDK, NINDS, SeniorHealth, NHLBI, CDC``; case-insensitive), default all.

Split by document, deterministic: pairs are grouped so that two pairs share a group when they come
from the same document (source + file), have the same focus (the disease or topic, lower-cased;
GARD and GHR both write about most rare diseases) or the same question text (lower-cased); the
groups are the connected components of these links (:func:`document_groups`). A group is held out
as a whole by the SHA-256 of its name (its smallest ``source/document``): ``test`` (about 10%),
``validation`` (about 10%) or ``train`` (the rest). So no document, no focus and no question text is
in two splits. The split is computed over all sources before ``name`` selects some, so a subset's
splits are those of the whole set. Records come in the order of a hash of each pair (its
``source/document`` and question), so the first N records (``data.max_examples``,
``data.max_validation_examples``, the SFT recipe's sample questions) are a random-like sample of pairs
from many documents and sources, the same whatever N.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

DATA_FILE = Path(__file__).parent / "assets" / "medquad" / "medquad.jsonl.gz"
SOURCES = ("CancerGov", "GARD", "GHR", "MPlusHealthTopics", "NIDDK", "NINDS", "SeniorHealth", "NHLBI", "CDC")
SPLIT_PERCENT = {"train": (20, 100), "validation": (10, 20), "test": (0, 10)}  # [low, high) of hash % 100


def load_medquad(subset: str | None, split: str) -> list[dict[str, Any]]:
    """Question/answer conversations of ``split`` from the sources in ``subset`` (module docstring).

    Raises:
        DataError: unknown split or source, or the vendored file is missing.
    """
    if split not in SPLIT_PERCENT:
        raise DataError(f"builtin:medquad has splits {list(SPLIT_PERCENT)}, not '{split}'")
    sources = _sources(subset)
    pairs = read_pairs()
    groups = document_groups(pairs)
    low, high = SPLIT_PERCENT[split]
    chosen = [i for i, p in enumerate(pairs) if p["source"] in sources and low <= _bucket(groups[i]) < high]
    chosen.sort(key=lambda i: (_digest(document_key(pairs[i]) + "\n" + pairs[i]["question"]), i))
    return [{"messages": [{"role": "user", "content": pairs[i]["question"]},
                          {"role": "assistant", "content": pairs[i]["answer"]}],
             "source": pairs[i]["source"], "document": pairs[i]["document"], "focus": pairs[i]["focus"],
             "qtype": pairs[i]["qtype"], "group": groups[i]} for i in chosen]


def read_pairs() -> list[dict[str, str]]:
    """The vendored pairs in file order (``source, document, focus, qtype, question, answer``)."""
    if not DATA_FILE.is_file():
        raise DataError(f"builtin:medquad: {DATA_FILE} is missing (reinstall tunelab)")
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def document_groups(pairs: list[dict[str, str]]) -> list[str]:
    """Group name of every pair: connected components of same document / focus / question text.

    Union-find over the pairs; each component is named by its smallest ``source/document`` key, so
    the name does not depend on the order of the pairs.
    """
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[str, str], int] = {}
    for i, pair in enumerate(pairs):
        keys = (("document", document_key(pair)), ("focus", pair["focus"].strip().lower()),
                ("question", " ".join(pair["question"].lower().split())))
        for key in keys:
            if key in first_with:
                a, b = find(i), find(first_with[key])
                if a != b:
                    parent[a] = b
            else:
                first_with[key] = i
    names: dict[int, str] = {}
    for i, pair in enumerate(pairs):
        root = find(i)
        names[root] = min(names.get(root, document_key(pair)), document_key(pair))
    return [names[find(i)] for i in range(len(pairs))]


def document_key(pair: dict[str, str]) -> str:
    """``source/document``: document file names repeat across sources."""
    return f"{pair['source']}/{pair['document']}"


def _sources(subset: str | None) -> set[str]:
    if not subset:
        return set(SOURCES)
    by_lower = {s.lower(): s for s in SOURCES}
    names = [s.strip() for s in subset.split(",") if s.strip()]
    unknown = [s for s in names if s.lower() not in by_lower]
    if unknown or not names:
        raise DataError(f"builtin:medquad has no source {unknown or repr(subset)}; name takes a comma-separated "
                        f"list of {', '.join(SOURCES)}")
    return {by_lower[s.lower()] for s in names}


def _digest(group: str) -> bytes:
    return hashlib.sha256(group.encode("utf-8")).digest()


def _bucket(group: str) -> int:
    return int.from_bytes(_digest(group)[:8], "big") % 100

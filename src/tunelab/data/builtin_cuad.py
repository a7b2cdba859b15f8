"""``builtin:cuad-clauses`` and ``builtin:cuad-governing-law``: clauses of real commercial contracts (CUAD v1).

Source: the Contract Understanding Atticus Dataset (Hendrycks et al. 2021, arXiv:2103.06268; The
Atticus Project, CC BY 4.0), expert annotations of 510 contracts from SEC EDGAR. A deterministic
subset is vendored in ``tunelab/data/assets/cuad/`` (LICENSE and README with the attribution; built by
``bench/vendor_cuad.py``): per contract and per category of :data:`CATEGORIES`, the annotated spans
of that category joined by newlines (at most 1,500 characters), at most 200 contracts per category
(the smallest salted SHA-256 of the contract name, independent of the split), every contract for Governing Law.

* ``cuad-clauses``: ``{"text": clause, "label": category, "contract"}``, 8 categories; for Governing
  Law only the 200 contracts chosen like the other categories (``in_clauses``), so no class dominates.
* ``cuad-governing-law``: ``{"messages": [user: instruction + Governing Law clause, assistant:
  jurisdiction], "answer", "contract"}`` for every contract whose ``Governing Law-Answer`` is not empty.
  Compare answers with :func:`normalize_jurisdiction`.

Splits by **contract**, deterministic, never a contract in two splits: the first byte of the
SHA-256 of the contract name maps to ``b * 100 // 256``; below 20 → ``test``, 20–29 →
``validation``, else ``train`` (about 70 / 10 / 20 %). Both built-ins use the same contract split.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from tunelab.data.builtin import vendored_request

DATA_FILE = Path(__file__).parent / "assets" / "cuad" / "cuad_clauses.jsonl.gz"
GOVERNING_LAW = "Governing Law"
CATEGORIES = ("Governing Law", "Anti-Assignment", "Cap On Liability", "License Grant", "Audit Rights", "Insurance",
              "Termination For Convenience", "Exclusivity")
SPLITS = ("train", "validation", "test")
TEST_PERCENT, VALIDATION_PERCENT = 20, 10
INSTRUCTION = ("Which jurisdiction's law governs this contract, according to the clause below? Answer with the "
               "jurisdiction only.\n\nClause: ")


def contract_split(contract: str) -> str:
    """``train``, ``validation`` or ``test`` for a contract name (see the module docstring)."""
    bucket = hashlib.sha256(contract.encode("utf-8")).digest()[0] * 100 // 256
    if bucket < TEST_PERCENT:
        return "test"
    return "validation" if bucket < TEST_PERCENT + VALIDATION_PERCENT else "train"


def _vendored(name: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    vendored_request(name, split, list(SPLITS), DATA_FILE, subset)
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if contract_split(r["contract"]) == split]


def load_cuad_clauses(subset: str | None, split: str) -> list[dict[str, Any]]:
    """Clause-type classification records of one split.

    Raises:
        DataError: a subset was given, an unknown split, or the vendored file is missing.
    """
    return [{"text": r["text"], "label": r["category"], "contract": r["contract"]}
            for r in _vendored("cuad-clauses", subset, split) if r.get("in_clauses", True)]


def load_cuad_governing_law(subset: str | None, split: str) -> list[dict[str, Any]]:
    """Governing-law extraction conversations of one split (contracts with a jurisdiction answer).

    Raises:
        DataError: a subset was given, an unknown split, or the vendored file is missing.
    """
    out = []
    for r in _vendored("cuad-governing-law", subset, split):
        if r["category"] == GOVERNING_LAW and r.get("answer"):
            out.append({"messages": [{"role": "user", "content": INSTRUCTION + r["text"]},
                                     {"role": "assistant", "content": r["answer"]}],
                        "answer": r["answer"], "contract": r["contract"]})
    return out


_PREFIXES = re.compile(r"^(?:the\s+)?(?:laws?\s+of\s+)?(?:the\s+)?(?:state|commonwealth|province|republic|kingdom)"
                       r"\s+of\s+|^(?:the\s+)?laws?\s+of\s+(?:the\s+)?|^the\s+")
_SAME = {"people's republic of china": "china", "prc": "china", "peoples republic of china": "china",
         "u.s.a.": "united states", "usa": "united states", "u.s.": "united states", "us": "united states",
         "uk": "united kingdom", "u.k.": "united kingdom", "new york state": "new york",
         "district of columbia": "washington dc", "washington, d.c.": "washington dc", "d.c.": "washington dc"}
_COUNTRY_SUFFIX = re.compile(r",\s*(?:united states(?: of america)?|usa|u\.s\.a\.|u\.s\.|united kingdom|uk|canada|"
                             r"australia|india|china)$")


def normalize_jurisdiction(answer: str) -> str:
    """A comparable form of a governing-law answer (what exact match compares).

    Lower-cased, whitespace collapsed, a trailing period dropped; split into jurisdictions on
    ``;`` and `` and `` (``England; Wales`` = ``England and Wales``); in each: leading "the laws of",
    "the State/Commonwealth/Province of" and "the" removed, a trailing country after a comma
    removed (``Ontario, Canada`` → ``ontario``; ``Delaware, USA`` → ``delaware``), and a few
    spellings unified (``People's Republic of China``/``PRC`` → ``china``). The jurisdictions are
    sorted and joined by ``; ``, so their order does not matter.
    """
    text = " ".join(answer.lower().replace("’", "'").split()).rstrip(".")
    parts = []
    for part in re.split(r";|\band\b", text):
        part = part.strip(" ,")
        part = _PREFIXES.sub("", part).strip(" ,")
        part = _COUNTRY_SUFFIX.sub("", part).strip(" ,")
        part = _SAME.get(part, part)
        if part:
            parts.append(part)
    return "; ".join(sorted(set(parts)))

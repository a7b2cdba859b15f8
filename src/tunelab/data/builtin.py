"""Datasets that ship inside pip packages, addressed as ``builtin:NAME`` in a config.

Each entry of :data:`BUILTINS` names a loader ``(subset, split) -> records``.

``builtin:chatterbot``: the chatterbot-corpus English Q/A conversations (BSD-3). ``name`` is a
comma-separated list of categories (file stems under ``chatterbot_corpus/data/english``), default
the support-desk topics ``tech_support,computers,coding,ai``. Each conversation ``[q, a1, a2, ...]``
lists alternative answers to ``q``; every (q, a_i) becomes one user/assistant conversation.
Exact duplicate conversations are removed, then questions are split deterministically into
``train`` (about 85%) and ``validation`` (about 15%) by a hash of the question, so no held-out
question (with any of its answers) is seen in training.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from tunelab.errors import DataError

CHATTERBOT_DEFAULT = "tech_support,computers,coding,ai"
# name → "module:function(subset, split) -> list[record]"; one line per built-in dataset.
BUILTINS: dict[str, str] = {
    "chatterbot": "tunelab.data.builtin:load_chatterbot",
    "arithmetic": "tunelab.data.builtin_arith:load_arithmetic",
    "drugreview-pairs": "tunelab.data.builtin_drugreview_pairs:load_drugreview_pairs",
    "drugreview": "tunelab.data.builtin_drugreview:load_drugreview",
    "qa-feedback": "tunelab.data.builtin_qa_feedback:load_qa_feedback",
    "summeval-pairs": "tunelab.data.builtin_summeval:load_summeval_pairs",
    "cuad-clauses": "tunelab.data.builtin_cuad:load_cuad_clauses",
    "cuad-governing-law": "tunelab.data.builtin_cuad:load_cuad_governing_law",
    "medquad": "tunelab.data.builtin_medquad:load_medquad",
    "pubmedqa": "tunelab.data.builtin_pubmedqa:load_pubmedqa",
}
VALIDATION_PERCENT = 15


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"built-in data needs the package {pip_name}: pip install {pip_name}")
    return Path(spec.submodule_search_locations[0])


def vendored_request(name: str, split: str, splits: Sequence[str], data_file: Path, subset: str | None = None,
                     subsets: Sequence[str] = ()) -> str | None:
    """Check a request for the vendored data set ``builtin:NAME``: ``split`` is one of ``splits``, ``subset``
    one of ``subsets`` (None = the first; a data set without subsets refuses any), ``data_file`` exists.

    Returns the subset to use (None for a data set without subsets).

    Raises:
        DataError: naming the data set and the bad split or subset, or the missing file.
    """
    if not subsets and subset:
        raise DataError(f"builtin:{name} has no subsets (got data name '{subset}')")
    if split not in splits:
        raise DataError(f"builtin:{name} has splits {_listed(splits)}, not '{split}'")
    chosen = subset or (subsets[0] if subsets else None)
    if subsets and chosen not in subsets:
        raise DataError(f"builtin:{name} has the subsets {_listed(subsets)}, not '{chosen}'")
    if not data_file.is_file():
        raise DataError(f"builtin:{name}: {data_file} is missing (reinstall tunelab)")
    return chosen


def _listed(values: Sequence[str]) -> str:
    """``'a'``, ``'a' and 'b'``, ``'a', 'b' and 'c'``."""
    quoted = [repr(v) for v in values]
    return " and ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)


def load_builtin(name: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    """Records of built-in dataset ``name`` (see :data:`BUILTINS`) for ``split``.

    Raises:
        DataError: unknown name, split or subset, or the package that ships the data is missing.
    """
    if name not in BUILTINS:
        raise DataError(f"unknown built-in dataset 'builtin:{name}'; available: "
                        + ", ".join(f"builtin:{n}" for n in sorted(BUILTINS)))
    module_name, _, func = BUILTINS[name].partition(":")
    return getattr(importlib.import_module(module_name), func)(subset, split)


def load_chatterbot(subset: str | None, split: str) -> list[dict[str, Any]]:
    """chatterbot-corpus categories ``subset`` (comma-separated) as user/assistant conversations."""
    import yaml

    if split not in ("train", "validation"):
        raise DataError(f"builtin:chatterbot has splits 'train' and 'validation', not '{split}'")
    categories = subset or CHATTERBOT_DEFAULT
    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    records, seen = [], set()
    for category in [c.strip() for c in categories.split(",") if c.strip()]:
        path = root / f"{category}.yml"
        if not path.is_file():
            available = ", ".join(sorted(p.stem for p in root.glob("*.yml")))
            raise DataError(f"builtin:chatterbot has no category '{category}'; available: {available}")
        for conv in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            texts = [str(t).strip() for t in conv]
            if len(texts) < 2 or (texts[0], tuple(texts[1:])) in seen:
                continue
            seen.add((texts[0], tuple(texts[1:])))
            if _holdout(texts[0]) != (split == "validation"):
                continue
            for answer in texts[1:]:
                records.append({"messages": [
                    {"role": "user", "content": texts[0]},
                    {"role": "assistant", "content": answer},
                ], "category": category})
    return records


def _holdout(question: str) -> bool:
    digest = hashlib.sha256(question.lower().encode("utf-8")).digest()
    return digest[0] * 100 // 256 < VALIDATION_PERCENT

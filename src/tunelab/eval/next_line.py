"""Next-line exact match on held-out Python functions: does the model know the codebase's API?

A *case* is one line of a held-out function's body (a function or method parsed with :mod:`ast`;
blank lines and docstring lines are not targets). The prompt is the function's source from its
first line (decorators included) up to the last non-blank line before the target, joined with
``\\n`` and **without** the final newline: BPE tokenizers merge newlines with the next line's
indentation (``"\\n   "`` in SmolLM2's), so the model writes them itself, as in training. The model
greedily continues; its predicted line is the first non-blank line after the first newline it
writes (:func:`predicted_line`; blank lines it writes in between are skipped, as blank targets are). A case counts as correct when that line equals the target after stripping whitespace at
both ends (:func:`same_line`).

The sample is fixed and model-independent: of all candidate lines of all held-out documents, the
``num`` with the smallest SHA-256 of ``"{document name}:{line number}"``. Documents that do not
parse as Python are skipped. Prompts keep the tokenizer's plain-text BOS
(:func:`tunelab.data.encoding.encode_text`) and are cut from the left to ``max_prompt_tokens``.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunelab.data.encoding import encode_text, special_tokens_around


@dataclass(frozen=True)
class NextLineCase:
    """One held-out line: ``prompt`` (function source before it), ``target`` (the line), where it is."""

    source: str
    lineno: int
    prompt: str
    target: str


def next_line_cases(documents: list[dict[str, Any]], num: int) -> list[NextLineCase]:
    """The fixed sample of ``num`` cases from documents ``{"text", "source"?}`` (see the module docstring).

    A document without ``source`` is named ``document #i`` (1-based). Returns fewer than ``num`` when
    there are fewer candidate lines, sorted by document name and line number.
    """
    candidates = []
    for i, doc in enumerate(documents, start=1):
        name = doc.get("source") or f"document #{i}"
        candidates.extend(_document_cases(doc.get("text", ""), name))
    ranked = sorted(candidates, key=lambda c: hashlib.sha256(f"{c.source}:{c.lineno}".encode()).digest())
    return sorted(ranked[:num], key=lambda c: (c.source, c.lineno))


def _document_cases(text: str, name: str) -> list[NextLineCase]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.split("\n")
    cases: dict[int, NextLineCase] = {}
    for node in ast.walk(tree):  # outer functions first: a nested function's line keeps the outer prompt
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        skip = _docstring_lines(node)
        for lineno in range(node.body[0].lineno, node.end_lineno + 1):
            if lineno in cases or lineno in skip or not lines[lineno - 1].strip():
                continue
            prompt = "\n".join(lines[start - 1: lineno - 1]).rstrip()
            cases[lineno] = NextLineCase(name, lineno, prompt, lines[lineno - 1])
    return list(cases.values())


def _docstring_lines(node: ast.AST) -> set[int]:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return set(range(first.lineno, first.end_lineno + 1))
    return set()


def predicted_line(continuation: str) -> str:
    """The first non-blank line the model wrote after finishing the prompt's last line (``""`` when
    none), i.e. after its first newline."""
    return next((line for line in continuation.split("\n")[1:] if line.strip()), "")


def line_complete(continuation: str) -> bool:
    """Whether the predicted line is finished: a non-blank line after the first newline, ended by a newline."""
    return any(line.strip() for line in continuation.split("\n")[1:-1])


def same_line(predicted: str, target: str) -> bool:
    """Exact match after stripping whitespace at both ends."""
    return predicted.strip() == target.strip()


@torch.no_grad()
def next_line_exact_match(
    model: nn.Module, tokenizer: Any, cases: list[NextLineCase], *, max_new_tokens: int, max_prompt_tokens: int,
    batch_size: int = 8, num_examples: int = 5,
) -> dict[str, Any]:
    """Greedy next-line exact match of ``model`` on ``cases``.

    Prompts are left-padded into batches of ``batch_size`` (attention mask 0 on padding, KV cache
    on); generation stops for a row once its predicted line is complete (:func:`line_complete`), at EOS,
    or after ``max_new_tokens``.

    Returns:
        ``{"next_line_exact_match": correct / cases, "num_lines": cases, "num_correct": int,
        "examples": the first ``num_examples`` cases with prompt tail, target and prediction}``.
    """
    was_training = model.training
    model.eval()
    predictions = []
    for i in range(0, len(cases), batch_size):
        batch = cases[i: i + batch_size]
        predictions.extend(_generate_lines(model, tokenizer, [c.prompt for c in batch], max_new_tokens,
                                           max_prompt_tokens))
    model.train(was_training)
    correct = [same_line(p, c.target) for p, c in zip(predictions, cases)]
    examples = [{"source": c.source, "line": c.lineno, "prompt_end": c.prompt.split("\n")[-1], "target": c.target,
                 "predicted": p, "correct": ok} for c, p, ok in list(zip(cases, predictions, correct))[:num_examples]]
    return {"next_line_exact_match": sum(correct) / max(len(cases), 1), "num_lines": len(cases),
            "num_correct": sum(correct), "examples": examples}


def _two_newlines_class():
    from transformers import StoppingCriteria

    class TwoNewlines(StoppingCriteria):  # transformers' per-row stopping hook (its base class, not ours)
        def __init__(self, tokenizer: Any, prompt_width: int):
            self.tokenizer, self.prompt_width = tokenizer, prompt_width

        def __call__(self, ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            texts = self.tokenizer.batch_decode(ids[:, self.prompt_width:], skip_special_tokens=True)
            return torch.tensor([line_complete(t) for t in texts], dtype=torch.bool, device=ids.device)

    return TwoNewlines


def _TwoNewlines(tokenizer: Any, prompt_width: int) -> Any:  # noqa: N802 - builds the criteria object
    """A stopping criterion: a row is done once its predicted line is complete."""
    return _two_newlines_class()(tokenizer, prompt_width)


def _generate_lines(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                    max_prompt_tokens: int) -> list[str]:
    from transformers import StoppingCriteriaList

    prefix, _ = special_tokens_around(tokenizer)
    rows = []
    for prompt in prompts:
        ids = encode_text(tokenizer, prompt, templated=False)[0]
        if len(ids) > max_prompt_tokens:  # keep the BOS policy's prefix, cut the oldest context
            keep = max_prompt_tokens - len(prefix)
            ids = (prefix if ids[: len(prefix)] == prefix else []) + ids[-keep:]
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long,
                                  device=device)

    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id, use_cache=True,
                         stopping_criteria=StoppingCriteriaList([_TwoNewlines(tokenizer, width)]))
    return [predicted_line(t) for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]

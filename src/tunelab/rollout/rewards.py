"""Reward functions: built-ins, a trained reward model, and your own Python functions.

Every reward term maps a batch of completions to one finite float per completion; the total
reward is the weighted sum of the terms (``rl.rewards``). Terms:

* ``exact_match``: 1.0 if the answer extracted from the completion equals the record's reference
  (``reference_field``, compared as stripped strings; numbers compared as numbers), else 0.0.
* ``regex``: 1.0 if the stripped completion matches ``pattern`` (``fullmatch`` or ``search``).
* ``length_penalty``: ``-max(0, n - max_tokens) / max_tokens`` for an ``n``-token completion.
* ``reward_model``: the score of a reward-model run (``task: reward``) on prompt + completion,
  rendered exactly as that run rendered its training pairs (chat template, else plain text + EOS).
* ``python``: ``path/to/file.py:function``, called as ``function(prompt, completion, example)``
  with the last user message, the completion text and the whole data record; must return a
  finite number. **The file is imported and run in-process with your permissions**, like any
  Python you run yourself; only point at code you trust.

Errors (missing file or function, an exception inside your function, a non-number, NaN or inf)
raise :class:`RewardError` naming the function, the prompt and the completion, so a non-finite
reward can never reach the advantages or the loss.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config.rl import (
    ExactMatchReward, LengthPenaltyReward, PythonReward, RegexReward, RewardModelReward, RewardSpec,
)
from tunelab.errors import TunelabError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class RewardError(TunelabError):
    """A reward function is missing, raised, or returned something that is not a finite number."""


@dataclass
class RewardInputs:
    """One batch to score: parallel lists of length B."""

    prompts: list[str]                      # last user message of each prompt
    messages: list[list[dict[str, str]]]    # the whole chat prompt
    completions: list[str]
    num_tokens: list[int]                   # completion length in tokens (incl. the stop token)
    examples: list[dict[str, Any]]          # the source records


@dataclass
class RewardTerm:
    """A named, weighted reward function ``fn(inputs) -> list[float]`` of length B."""

    name: str
    weight: float
    fn: Callable[[RewardInputs], list[float]]
    source: str = ""  # how errors name it, e.g. 'examples/rewards.py:brevity' (default: name)


def _snippet(text: str, n: int = 200) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")


def _fail(name: str, inputs: RewardInputs, row: int, problem: str) -> RewardError:
    return RewardError(f"reward function {name} {problem}\n  prompt: {_snippet(inputs.prompts[row])}\n"
                       f"  completion: {_snippet(inputs.completions[row])}")


def extract_answer(completion: str, spec: ExactMatchReward) -> str | None:
    """The part of ``completion`` that ``exact_match`` compares (None if nothing matches)."""
    if spec.extract == "full":
        return completion.strip()
    if spec.extract == "last_number":
        found = NUMBER.findall(completion)
        return found[-1].replace(",", "") if found else None
    matches = list(re.finditer(spec.pattern, completion))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.re.groups else last.group(0)).strip()


def _same(answer: str | None, reference: Any) -> bool:
    if answer is None:
        return False
    reference = str(reference).strip()
    try:
        return float(answer) == float(reference.replace(",", ""))
    except ValueError:
        return answer == reference


def _exact_match(spec: ExactMatchReward) -> Callable[[RewardInputs], list[float]]:
    def fn(inputs: RewardInputs) -> list[float]:
        scores = []
        for row, (completion, example) in enumerate(zip(inputs.completions, inputs.examples)):
            if spec.reference_field not in example:
                raise _fail("exact_match", inputs, row, f"needs the field '{spec.reference_field}' in every record "
                            f"(record has {sorted(example)}); set reference_field")
            scores.append(float(_same(extract_answer(completion, spec), example[spec.reference_field])))
        return scores
    return fn


def _regex(spec: RegexReward) -> Callable[[RewardInputs], list[float]]:
    pattern = re.compile(spec.pattern, re.DOTALL)
    match = pattern.fullmatch if spec.mode == "fullmatch" else pattern.search
    return lambda inputs: [float(match(c.strip()) is not None) for c in inputs.completions]


def _length_penalty(spec: LengthPenaltyReward) -> Callable[[RewardInputs], list[float]]:
    return lambda inputs: [-max(0, n - spec.max_tokens) / spec.max_tokens for n in inputs.num_tokens]


def load_python_function(spec: str) -> Callable[..., Any]:
    """Import ``path/to/file.py:function`` (in-process: it is the user's own code) and return the function.

    Raises:
        RewardError: malformed spec, missing file, an error while importing, or no such callable.
    """
    path_text, sep, func_name = spec.rpartition(":")
    if not sep or not path_text.endswith(".py") or not func_name.isidentifier():
        raise RewardError(f"reward function '{spec}': expected 'path/to/file.py:function_name'")
    path = Path(path_text)
    if not path.is_file():
        raise RewardError(f"reward function '{spec}': file not found: {path.resolve()}")
    module_spec = importlib.util.spec_from_file_location(f"tunelab_user_rewards_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's module may raise anything at import
        raise RewardError(f"reward function '{spec}': importing {path} failed: {type(err).__name__}: {err}") from err
    fn = getattr(module, func_name, None)
    if not callable(fn):
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardError(f"reward function '{spec}': {path} has no function '{func_name}' (has: {available})")
    return fn


def _python(spec: PythonReward) -> Callable[[RewardInputs], list[float]]:
    fn = load_python_function(spec.function)

    def call(inputs: RewardInputs) -> list[float]:
        scores = []
        for row, (prompt, completion, example) in enumerate(zip(inputs.prompts, inputs.completions, inputs.examples)):
            try:
                value = fn(prompt, completion, example)
            except Exception as err:  # the user's function may raise anything
                raise _fail(spec.function, inputs, row, f"raised {type(err).__name__}: {err}") from err
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise _fail(spec.function, inputs, row, f"returned {value!r} ({type(value).__name__}), not a number")
            scores.append(float(value))
        return scores
    return call


def _reward_model(spec: RewardModelReward, device: torch.device, key: str) -> Callable[[RewardInputs], list[float]]:
    """Scorer of a reward-model run; ``key`` (e.g. ``rl.rewards[0].run_dir``) names the config entry in errors.

    Raises:
        RewardError: the directory is missing, is not a run or model directory, is a tunelab run of
            another kind (an SFT or PPO run: its task_type is not SEQ_CLS), or its head has more than
            one output (a classifier, not a reward model).
    """
    from transformers import AutoModelForSequenceClassification

    from tunelab.errors import ModelLoadError
    from tunelab.models.heads import sequence_logits
    from tunelab.models.run import load_run, read_run_info

    where = f"{key}={spec.run_dir}"
    if not Path(spec.run_dir).is_dir():
        raise RewardError(f"{where}: run directory not found (relative paths start from the working directory "
                          f"{Path.cwd()}; train one with task: reward)")
    try:
        info = read_run_info(spec.run_dir)
    except ModelLoadError as exc:
        raise RewardError(f"{where}: {exc}") from exc
    if "task_type" in info and info["task_type"] != "SEQ_CLS":
        raise RewardError(f"{where} is a tunelab run with task_type {info['task_type']}, not a reward model "
                          "(train one with task: reward)")
    model, tokenizer, _ = load_run(spec.run_dir, auto_class=AutoModelForSequenceClassification)
    if model.config.num_labels != 1:
        raise RewardError(f"{where}: its head has {model.config.num_labels} outputs (a classifier); a reward model "
                          "scores with one (train one with task: reward)")
    model.to(device).eval().requires_grad_(False)

    def render(messages: list[dict[str, str]], prompt: str, completion: str) -> str:
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                                 tokenize=False)
        return prompt + completion + (tokenizer.eos_token or "")

    @torch.no_grad()
    def score(inputs: RewardInputs) -> list[float]:
        texts = [render(m, p, c) for m, p, c in zip(inputs.messages, inputs.prompts, inputs.completions)]
        add_special = not bool(tokenizer.chat_template)
        scores = []
        for i in range(0, len(texts), spec.batch_size):
            batch = tokenizer(texts[i:i + spec.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=add_special)
            scores += sequence_logits(model, {k: v.to(device) for k, v in batch.items()})[:, 0].float().tolist()
        return scores
    return score


def build_reward_terms(specs: list[RewardSpec], device: torch.device = torch.device("cpu")) -> list[RewardTerm]:
    """Reward terms for ``rl.rewards`` (loads reward models and user files now, so errors come early)."""
    terms = []
    for i, spec in enumerate(specs):
        if isinstance(spec, ExactMatchReward):
            name, fn = "exact_match", _exact_match(spec)
        elif isinstance(spec, RegexReward):
            name, fn = "regex", _regex(spec)
        elif isinstance(spec, LengthPenaltyReward):
            name, fn = "length_penalty", _length_penalty(spec)
        elif isinstance(spec, RewardModelReward):
            name, fn = "reward_model", _reward_model(spec, device, f"rl.rewards[{i}].run_dir")
        else:
            name, fn = spec.function.rpartition(":")[2], _python(spec)
        if any(t.name == name for t in terms):
            name = f"{name}_{i}"
        source = spec.function if isinstance(spec, PythonReward) else name
        terms.append(RewardTerm(name, spec.weight, fn, source))
    return terms


def compute_rewards(terms: list[RewardTerm], inputs: RewardInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total reward (B,) float32 = sum of weight × term, and each term's raw (B,) scores.

    Raises:
        RewardError: a term returned the wrong number of values or a non-finite value (naming the
            term, the prompt and the completion).
    """
    size = len(inputs.completions)
    total = torch.zeros(size, dtype=torch.float32)
    per_term = {}
    for term in terms:
        values = list(term.fn(inputs))
        if len(values) != size:
            raise RewardError(f"reward function {term.source or term.name} returned {len(values)} values for {size} completions")
        for row, value in enumerate(values):
            if not math.isfinite(value):
                raise _fail(term.source or term.name, inputs, row, f"returned a non-finite value ({value})")
        per_term[term.name] = torch.tensor(values, dtype=torch.float32)
        total += term.weight * per_term[term.name]
    return total, per_term

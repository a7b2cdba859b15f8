"""Reward terms: built-ins with hand-checked values, user files, and every error naming function/prompt/completion."""

import math

import pytest
import torch

from tunelab.config.rl import ExactMatchReward, LengthPenaltyReward, PythonReward, RegexReward
from tunelab.rollout.rewards import RewardError, RewardInputs, build_reward_terms, compute_rewards


def inputs(completions, answers=None, num_tokens=None):
    n = len(completions)
    return RewardInputs(prompts=[f"question {i}" for i in range(n)], messages=[[]] * n, completions=completions,
                        num_tokens=num_tokens or [len(c.split()) for c in completions],
                        examples=[{"answer": a} for a in (answers or ["0"] * n)])


def test_builtins_hand_checked():
    terms = build_reward_terms([
        ExactMatchReward(type="exact_match"),
        RegexReward(type="regex", pattern=r"-?\d+"),
        LengthPenaltyReward(type="length_penalty", max_tokens=4, weight=2.0),
    ])
    batch = inputs(["so it is 12", "12", "1,200", "no idea at all really now"], ["12", "12", "1200", "3"],
                   num_tokens=[4, 1, 1, 6])
    total, per = compute_rewards(terms, batch)
    assert per["exact_match"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert per["regex"].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert per["length_penalty"].tolist() == [0.0, 0.0, 0.0, -0.5]   # -(6 - 4) / 4
    assert total.tolist() == [1.0, 2.0, 1.0, -1.0]                     # weights 1, 1, 2


def test_exact_match_regex_and_full_extraction():
    regex = build_reward_terms([ExactMatchReward(type="exact_match", extract="regex", pattern=r"Answer: (\w+)")])
    full = build_reward_terms([ExactMatchReward(type="exact_match", extract="full")])
    batch = inputs(["Answer: x then Answer: paris", " paris "], ["paris", "paris"])
    assert compute_rewards(regex, batch)[1]["exact_match"].tolist() == [1.0, 0.0]
    assert compute_rewards(full, batch)[1]["exact_match"].tolist() == [0.0, 1.0]


def _user_file(tmp_path, body):
    path = tmp_path / "my_rewards.py"
    path.write_text(body)
    return path


def test_python_reward_gets_prompt_completion_and_record(tmp_path):
    path = _user_file(tmp_path, "def f(prompt, completion, example):\n"
                                "    return len(completion) + (prompt == 'question 0') + int(example['answer'])\n")
    terms = build_reward_terms([PythonReward(type="python", function=f"{path}:f", weight=0.5)])
    total, per = compute_rewards(terms, inputs(["abc", "de"], ["10", "20"]))
    assert per["f"].tolist() == [14.0, 22.0] and total.tolist() == [7.0, 11.0]


def test_missing_file_and_function_are_named(tmp_path):
    with pytest.raises(RewardError, match="nope.py:f.*file not found"):
        build_reward_terms([PythonReward(type="python", function=f"{tmp_path}/nope.py:f")])
    path = _user_file(tmp_path, "def g(prompt, completion, example):\n    return 1.0\n")
    with pytest.raises(RewardError, match=r"has no function 'f' \(has: \['g'\]\)"):
        build_reward_terms([PythonReward(type="python", function=f"{path}:f")])
    with pytest.raises(RewardError, match="expected 'path/to/file.py:function_name'"):
        build_reward_terms([PythonReward(type="python", function="rewards.py")])


@pytest.mark.parametrize("body, problem, row", [
    ("def f(prompt, completion, example):\n    raise KeyError('answer')\n", "raised KeyError", 0),
    ("def f(prompt, completion, example):\n    return float('nan') if completion == 'bad' else 1.0\n", "non-finite", 1),
    ("import math\ndef f(prompt, completion, example):\n    return -math.inf if completion == 'bad' else 1.0\n",
     "non-finite", 1),
    ("def f(prompt, completion, example):\n    return 'high' if completion == 'bad' else 1.0\n", "not a number", 1),
    ("def f(prompt, completion, example):\n    return None\n", "not a number", 0),
])
def test_user_function_errors_name_function_prompt_and_completion(tmp_path, body, problem, row):
    path = _user_file(tmp_path, body)
    terms = build_reward_terms([PythonReward(type="python", function=f"{path}:f")])
    with pytest.raises(RewardError) as err:
        compute_rewards(terms, inputs(["good", "bad"]))
    message = str(err.value)
    assert problem in message and f"{path}:f" in message
    assert f"prompt: 'question {row}'" in message and f"completion: '{['good', 'bad'][row]}'" in message


def test_import_error_in_user_file_is_named(tmp_path):
    path = _user_file(tmp_path, "import not_a_module_xyz\n")
    with pytest.raises(RewardError, match="importing .* failed: ModuleNotFoundError"):
        build_reward_terms([PythonReward(type="python", function=f"{path}:f")])


def test_non_finite_from_any_term_is_rejected_before_it_can_be_summed():
    from tunelab.rollout.rewards import RewardTerm

    term = RewardTerm("reward_model", 1.0, lambda batch: [0.5, math.nan])
    with pytest.raises(RewardError, match="reward_model returned a non-finite value"):
        compute_rewards([term], inputs(["a", "b"]))
    wrong = RewardTerm("short", 1.0, lambda batch: [0.5])
    with pytest.raises(RewardError, match="returned 1 values for 2"):
        compute_rewards([wrong], inputs(["a", "b"]))
    assert isinstance(compute_rewards([RewardTerm("ok", 1.0, lambda b: [1, 2])], inputs(["a", "b"]))[0], torch.Tensor)


def test_example_rewards_file_loads():
    terms = build_reward_terms([PythonReward(type="python", function="examples/rewards.py:brevity"),
                                PythonReward(type="python", function="examples/rewards.py:says_answer_first")])
    _, per = compute_rewards(terms, inputs(["12", " ".join(["word"] * 40) + " 12"], ["12", "12"]))
    assert per["brevity"].tolist() == [1.0, 0.0] and per["says_answer_first"].tolist() == [1.0, 1.0]


def test_correct_and_bare_gives_no_format_reward_to_wrong_numbers():
    terms = build_reward_terms([PythonReward(type="python", function="examples/rewards.py:correct_and_bare")])
    _, per = compute_rewards(terms, inputs(["12", " 12.", "7", "The answer is 12"], ["12", "12", "12", "12"]))
    assert per["correct_and_bare"].tolist() == [1.0, 1.0, 0.0, 0.0]

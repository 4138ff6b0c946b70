"""Python reward functions: loaded by module or file, called with TRL's arguments, their values checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import PPOConfig
from rlhf.errors import ConfigError, RlhfError
from rlhf.train.reward_functions import RewardFunctions, load_reward_function, prompt_rows


def write_module(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(body)
    return path


def test_functions_load_from_a_module_or_a_file_and_bad_specs_say_why(tmp_path: Path) -> None:
    assert load_reward_function("os.path:basename")("a/b") == "b"
    path = write_module(
        tmp_path, "def exact(prompts, completions, answer, **kw):\n    return [1.0] * len(prompts)\n"
    )
    assert load_reward_function(f"{path}:exact").__name__ == "exact"
    for spec, says in [
        ("no_colon", "should be 'module:function'"),
        (f"{tmp_path}/absent.py:f", "no file"),
        (f"{path}:missing", "has no function 'missing'"),
        ("rlhf_no_such_module:f", "could not be imported: ModuleNotFoundError"),
    ]:
        with pytest.raises(ConfigError, match=says):
            load_reward_function(spec)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('bad import')\n")
    with pytest.raises(ConfigError, match="RuntimeError: bad import"):
        load_reward_function(f"{broken}:f")


def test_a_call_gets_trl_arguments_and_sums_weighted_values(tmp_path: Path) -> None:
    path = write_module(
        tmp_path,
        """
SEEN = []
def exact(prompts, completions, answer, **kwargs):
    SEEN.append(dict(prompts=prompts, completions=completions, answer=answer, **kwargs))
    return [None if a is None else float(c == a) for c, a in zip(completions, answer)]
def short(completions, completion_ids):  # no **kwargs: it gets the arguments it names
    return [len(ids) <= 2 for ids in completion_ids]
""",
    )
    functions = RewardFunctions([f"{path}:exact", f"{path}:short"], [2.0, 0.5])
    rows = [
        {"prompt": "2+2?", "answer": "4"},
        {"prompt": "hi", "level": 3},
        {"prompt": "2+2?", "answer": "4"},
    ]
    totals, means = functions(rows, ["4", "hello", "5"], [[7], [1, 2, 3], [8]])

    assert totals == [2.0 + 0.5, 0.0 + 0.0, 0.0 + 0.5]  # None adds nothing; a bool counts as 1 or 0
    assert means == {"exact": 1 / 3, "short": 2 / 3}
    (call,) = functions.functions[0].__globals__["SEEN"]
    assert call["prompts"] == ["2+2?", "hi", "2+2?"] and call["completions"] == ["4", "hello", "5"]
    assert call["answer"] == ["4", None, "4"] and call["level"] == [None, 3, None]  # every column, per answer
    assert call["completion_ids"] == [[7], [1, 2, 3], [8]]


def test_tensors_are_taken_and_functions_of_one_name_are_logged_apart(tmp_path: Path) -> None:
    one, two = tmp_path / "one.py", tmp_path / "two.py"
    one.write_text("import torch\ndef reward(completions, **kw):\n    return torch.ones(len(completions))\n")
    two.write_text("def reward(completions, **kw):\n    return [2.0] * len(completions)\n")
    totals, means = RewardFunctions([f"{one}:reward", f"{two}:reward"])([{"prompt": "p"}], ["a"], [[1]])
    assert totals == [3.0] and means == {"reward": 1.0, "reward_2": 2.0}
    # a function whose own name is the suffixed one: each of the three keeps its own key
    two.write_text(
        two.read_text() + "def reward_2(completions, **kw):\n    return [4.0] * len(completions)\n"
    )
    functions = RewardFunctions([f"{one}:reward", f"{two}:reward", f"{two}:reward_2"])
    totals, means = functions([{"prompt": "p"}], ["a"], [[1]])
    assert totals == [7.0] and means == {"reward": 1.0, "reward_2": 2.0, "reward_2_2": 4.0}


def test_chat_rows_get_messages_and_bad_values_name_the_function_and_answer(tmp_path: Path) -> None:
    path = write_module(
        tmp_path,
        """
def echo(prompts, completions, **kw):
    return [float(len(p)) + len(c[0]["content"]) for p, c in zip(prompts, completions)]
def nan(prompts, completions, **kw):
    return [float("nan")] * len(prompts)
def few(prompts, completions, **kw):
    return [1.0]
def text(prompts, completions, **kw):
    return ["good"] * len(prompts)
def fails(prompts, completions, **kw):
    raise KeyError("answer")
def one(prompts, completions, **kw):
    return 1.0
""",
    )
    messages = [{"role": "user", "content": "Hi"}]
    totals, _ = RewardFunctions([f"{path}:echo"])([{"messages": messages}], ["abc"], [[1]])
    assert totals == [1.0 + 3]  # the prompt as its messages, the answer as an assistant message
    answered = [*messages, {"role": "assistant", "content": "A reference answer."}]
    totals, _ = RewardFunctions([f"{path}:echo"])([{"messages": answered}], ["abc"], [[1]])
    assert totals == [1.0 + 3]  # the conversation the policy answered: not the row's own answer
    totals, _ = RewardFunctions([f"{path}:echo"])([{"prompt": answered}], ["abc"], [[1]])
    assert totals == [1.0 + 3]  # TRL's conversational prompt-only row: a `prompt` list is messages too
    for name, says in [("nan", "returned nan for answer 0"), ("few", "returned 1 values for 2 answers"),
                       ("text", "returned 'good' for answer 0"), ("fails", "raised KeyError"),
                       ("one", "returned 1.0: a list of one value per answer")]:  # fmt: skip
        with pytest.raises(RlhfError, match=f"{name} {says}"):
            RewardFunctions([f"{path}:{name}"])([{"prompt": "a"}, {"prompt": "b"}], ["x", "y"], [[1], [2]])


def test_config_needs_something_to_score_and_a_weight_per_function(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing scores the answers"):
        PPOConfig(reward_model=None)
    with pytest.raises(ValueError, match="reward_ensemble and safety_reward_model score beside reward_model"):
        PPOConfig(reward_model=None, reward_functions=["m:f"], reward_ensemble=["rm2"])
    with pytest.raises(ValueError, match="1 weights for 2 reward_functions"):
        PPOConfig(reward_functions=["m:f", "m:g"], reward_function_weights=[1.0])
    assert PPOConfig(reward_model=None, reward_functions=["m:f"]).reward_model is None


def test_prompt_rows_keep_the_file_order_and_give_every_row_every_column(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n{"prompt": "b"}\n{"prompt": "c", "answer": 3}\n')
    rows = prompt_rows(str(path))
    assert rows == [
        {"prompt": "a", "answer": 1},
        {"prompt": "b", "answer": None},
        {"prompt": "c", "answer": 3},
    ]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text('{"messages": [{"role": "user", "content": "d"}], "level": 2}\n')
    assert prompt_rows(str(held_out), rows[0]) == [  # the training file's columns, not its prompt key
        {"messages": [{"role": "user", "content": "d"}], "level": 2, "answer": None}
    ]


def test_a_batch_whose_rows_lack_a_column_of_the_file_still_passes_it(tmp_path: Path) -> None:
    path = write_module(
        tmp_path,
        "def exact(completions, answer, **kw):\n    return [None if a is None else 1.0 for a in answer]\n",
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "answer": 1}\n{"prompt": "b"}\n{"prompt": "c"}\n')
    rows = prompt_rows(str(prompts))
    totals, means = RewardFunctions([f"{path}:exact"])([rows[1], rows[2]], ["x", "y"], [[1], [2]])
    assert totals == [0.0, 0.0] and means == {"exact": 0.0}  # a batch of the rows without an answer


def test_the_gold_judge_is_a_reward_function() -> None:
    from rlhf.labelers import gold

    prompt = "User: What is 3 plus 4?\nAssistant:"
    functions = RewardFunctions(["rlhf.labelers.gold:reward"])
    totals, _ = functions([{"prompt": prompt}] * 2, ["7.", "Sure! 3 plus 4 is 9."], [[1], [2]])
    assert totals == [gold.utility(prompt, "7.", True), gold.utility(prompt, "Sure! 3 plus 4 is 9.", True)]
    assert totals[0] > totals[1]

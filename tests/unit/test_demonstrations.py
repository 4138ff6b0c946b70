"""rlhf.train.demonstrations on the SFT shapes TRL documents: prompt-completion (plain and conversational),
messages and text rows, down to the tokens and labels they train on, and the row a malformed one is named by."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset

from rlhf.config import load_config
from rlhf.errors import DataError
from rlhf.models.tokens import prepare_tokenizer
from rlhf.train.demonstrations import read_demonstrations, tokenize_demonstrations
from rlhf.train.lm_loop import IGNORE
from tests.archs import build_tokenizer

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Is the sky green?"}
ASSISTANT = {"role": "assistant", "content": "No, it is blue."}


@pytest.fixture(scope="module")
def chatml() -> Any:
    """No BOS, turns closed by <|im_end|> (Qwen base), with a PAD of its own as every stage loads it."""
    return prepare_tokenizer(build_tokenizer("chatml"))


@pytest.fixture(scope="module")
def llama() -> Any:
    """BOS added, EOS closes the default template's assistant turn."""
    return prepare_tokenizer(build_tokenizer("llama"))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_completion_rows_train_on_the_completion_only(tmp_path: Path, llama: Any) -> None:
    prompt, completion = "User: Is the sky green?\nAssistant:", " No, it is blue."
    rows = [{"prompt": prompt, "completion": completion}, {"prompt": prompt, "response": completion}]
    pairs = read_demonstrations(write_rows(tmp_path / "d.jsonl", rows), llama)
    assert pairs == [(prompt, completion)] * 2  # `completion` reads as `response` does
    (example, _), _, _ = tokenize_demonstrations(pairs, llama, 128)
    prompt_ids = [llama.bos_token_id, *llama(prompt, add_special_tokens=False)["input_ids"]]
    completion_ids = [*llama(completion, add_special_tokens=False)["input_ids"], llama.eos_token_id]
    assert example["input_ids"] == prompt_ids + completion_ids
    assert example["labels"] == [IGNORE] * len(prompt_ids) + completion_ids


def test_conversational_prompt_completion_trains_on_the_assistant_turn_only(
    tmp_path: Path, chatml: Any
) -> None:
    row = {"prompt": [SYSTEM, USER], "completion": [ASSISTANT]}
    ((prompt, response),) = read_demonstrations(write_rows(tmp_path / "d.jsonl", [row]), chatml)
    assert prompt == chatml.apply_chat_template([SYSTEM, USER], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and response == "No, it is blue.<|im_end|>"
    (example,), _, _ = tokenize_demonstrations([(prompt, response)], chatml, 128)
    n_prompt = len(chatml(prompt, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE] * n_prompt  # system, user and the generation prompt
    answer = example["labels"][n_prompt:]
    assert IGNORE not in answer and answer == example["input_ids"][n_prompt:]
    assert answer[-1] == chatml.convert_tokens_to_ids("<|im_end|>")
    assert chatml.decode(answer[:-1]) == "No, it is blue."
    # the same conversation as one `messages` row trains on the same tokens
    messages = read_demonstrations(
        write_rows(tmp_path / "m.jsonl", [{"messages": [SYSTEM, USER, ASSISTANT]}]), chatml
    )
    assert messages == [(prompt, response)]


def test_conversational_rows_from_parquet_read_as_from_jsonl(tmp_path: Path, chatml: Any) -> None:
    rows = [
        {"prompt": [USER], "completion": [ASSISTANT]},
        {"prompt": [SYSTEM, USER], "completion": [{"role": "assistant", "content": "No."}]},
    ]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    expected = read_demonstrations(write_rows(tmp_path / "d.jsonl", rows), chatml)
    assert read_demonstrations(tmp_path / "d.parquet", chatml) == expected
    assert [r for _, r in expected] == ["No, it is blue.<|im_end|>", "No.<|im_end|>"]


def test_text_rows_train_on_every_token_but_bos(tmp_path: Path, llama: Any) -> None:
    text = "The sky is blue."
    pairs = read_demonstrations(write_rows(tmp_path / "d.jsonl", [{"text": text}]), llama)
    assert pairs == [("", text)]
    (example,), _, _ = tokenize_demonstrations(pairs, llama, 128)
    ids = [*llama(text, add_special_tokens=False)["input_ids"], llama.eos_token_id]
    assert example["input_ids"] == [llama.bos_token_id, *ids]
    assert example["labels"] == [IGNORE, *ids]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "User: Hi\nAssistant:", "completion": 4}, "field 'completion' should be str, got int"),
        (
            {"prompt": [USER], "completion": [USER]},
            "'completion' should end with the assistant's turn, got roles \\['user'\\]",
        ),
        ({"prompt": [USER], "completion": []}, "'completion' must be a list of \\{role, content\\} objects"),
        (
            {"prompt": [USER], "completion": [{"content": "No."}]},
            "completion\\[0\\] needs a 'role' and a 'content' string, got \\{'role': None, 'content': 'No.'\\}",
        ),
        (  # a null content: named, not left to the chat template to fail on
            {"messages": [USER, {"role": "assistant", "content": None}]},
            "messages\\[1\\] needs a 'role' and a 'content' string",
        ),
        (
            {"prompt": "User: Hi\nAssistant:", "completion": [ASSISTANT]},
            "'prompt' and 'completion' should both be message lists or both be str",
        ),
        ({"text": ["a", "b"]}, "field 'text' should be str, got list"),
        # every name the missing field may have, and the keys the row has (what a column mapping would read)
        ({"prompt": "Hi"}, "missing field 'completion' \\(or 'response'\\); the row's keys are 'prompt'$"),
        (
            {"instruction": "Name a colour.", "input": "", "output": "Blue."},
            "missing field 'prompt' \\(or 'messages' or 'text'\\); the row's keys are 'instruction', 'input', "
            "'output'$",
        ),
        ({}, "missing field 'prompt' \\(or 'messages' or 'text'\\); the row has no keys$"),
    ],
)
def test_a_malformed_row_names_its_file_and_row(
    tmp_path: Path, chatml: Any, bad: dict[str, Any], message: str
) -> None:
    good = {"prompt": [USER], "completion": [ASSISTANT]}
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'd.jsonl'))}:2: {message}"):
        read_demonstrations(write_rows(tmp_path / "d.jsonl", [good, bad]), chatml)


def test_sft_columns_read_alpaca_rows_as_prompt_completion(tmp_path: Path, llama: Any) -> None:
    """`sft.columns` maps our fields to the data's columns, as `reward.columns` and `dpo.columns` do."""
    cfg = load_config(None, ["sft.columns={prompt: instruction, completion: output}"])
    assert cfg.sft.columns == {"prompt": "instruction", "completion": "output"}
    alpaca = [{"instruction": "Is the sky green?", "input": "", "output": " No, it is blue."}]
    pairs = read_demonstrations(write_rows(tmp_path / "a.jsonl", alpaca), llama, cfg.sft.columns)
    assert pairs == [("Is the sky green?", " No, it is blue.")]
    plain = [{"prompt": "Is the sky green?", "completion": " No, it is blue."}]
    assert pairs == read_demonstrations(write_rows(tmp_path / "p.jsonl", plain), llama)
    # a mapped column the row lacks is named as the preference readers name it
    rows = [*alpaca, {"instruction": "Hi", "response": " Hello!"}]
    with pytest.raises(
        DataError,
        match=r"a\.jsonl:2: missing column 'output' \(the column mapping reads 'completion' from it\)$",
    ):
        read_demonstrations(write_rows(tmp_path / "a.jsonl", rows), llama, cfg.sft.columns)

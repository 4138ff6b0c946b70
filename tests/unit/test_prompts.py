"""rlhf/data/prompts.py: the prompts of generate and PPO as {prompt} or {messages} rows, from files and folders."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest

from rlhf.data.prompts import read_prompt_rows, read_prompts
from rlhf.errors import DataError
from rlhf.models.tokenizer import train_bpe_tokenizer

CORPUS = ["User: What is 2 plus 3?\nAssistant: 5."] * 20 + ["User: Hello!\nAssistant: Hello!"] * 20
ROWS = [
    {"messages": [{"role": "user", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                  {"role": "user", "content": "2+2?"}], "prompt_id": "q2"},
]  # fmt: skip
RENDERED = ["User: Hello!\nAssistant:", "User: Hi\nAssistant: Hey</s>\nUser: 2+2?\nAssistant:"]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def test_messages_rows_render_with_the_chat_template_and_a_generation_prompt(
    tmp_path: Path, tokenizer
) -> None:
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # a message list in a table gets every struct field; the other prompt ids are null there
    datasets.Dataset.from_list(ROWS[::-1]).to_parquet(tmp_path / "prompts.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
    eos = tokenizer.eos_token
    rendered = [text.replace("</s>", eos) for text in RENDERED]
    assert read_prompt_rows(jsonl, tokenizer=tokenizer) == [("prompts:1", rendered[0]), ("q2", rendered[1])]
    assert read_prompts(tmp_path / "prompts.parquet", tokenizer=tokenizer) == rendered[::-1]
    assert read_prompt_rows(tmp_path / "saved", 1, tokenizer) == [("saved:1", rendered[0])]


def test_a_conversation_is_the_prompt_before_its_answer_and_over_a_prompt_string(
    tmp_path: Path, tokenizer
) -> None:
    """ultrafeedback_binarized rows: `messages` holds the prompt and its answer, `prompt` the bare user text; the
    policy samples after the templated conversation (what the reward model scored), without the answer."""
    path = tmp_path / "uf.jsonl"
    turns = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}]
    path.write_text(json.dumps({"prompt": "Hello!", "messages": turns, "prompt_id": "u1"}) + "\n")
    assert read_prompt_rows(path, tokenizer=tokenizer) == [("u1", "User: Hello!\nAssistant:")]
    assert read_prompt_rows(path) == [("u1", "Hello!")]  # no tokenizer (CAI): the prompt string
    path.write_text(json.dumps({"messages": turns[1:]}) + "\n")
    with pytest.raises(DataError, match=r"uf.jsonl:1: 'messages' holds only assistant turns"):
        read_prompt_rows(path, tokenizer=tokenizer)


def test_a_prompt_list_is_a_conversation_as_in_trl_prompt_only_rows(tmp_path: Path, tokenizer) -> None:
    """TRL's conversational prompt-only rows ({"prompt": [messages]}, as its GRPO datasets give them) render as a
    `messages` row does."""
    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["messages"], "answer": "4"}) + "\n" for r in ROWS))
    eos = tokenizer.eos_token
    assert read_prompts(path, tokenizer=tokenizer) == [text.replace("</s>", eos) for text in RENDERED]
    with pytest.raises(
        DataError, match=r"trl.jsonl:1: a conversation in 'prompt' needs a tokenizer with a chat"
    ):
        read_prompts(path)  # no tokenizer (CAI): a conversation cannot be read as text


def test_prompt_rows_keep_their_text_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "rl.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "id": 7}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    assert read_prompt_rows(path) == [("7", "2+2?"), ("rl:2", "Hi")]


def test_one_id_for_two_prompts_is_an_error_naming_both_rows(tmp_path: Path) -> None:
    """Answers are filed under their prompt's id: in the loop, the second prompt's answers went to the first,
    and labelers judged answers about a cat as answers about an egg."""
    path = tmp_path / "dup.jsonl"
    rows = [{"prompt": "How do I boil an egg?", "prompt_id": "x"}, {"prompt": "Hello!", "prompt_id": "y"},
            {"prompt": "A name for a cat?", "prompt_id": "x"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        DataError, match=r"dup.jsonl:3: prompt_id 'x' is also the id of another prompt \(.*dup.jsonl:1\)"
    ):
        read_prompt_rows(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + rows[:1]))  # the same prompt again
    assert [i for i, _ in read_prompt_rows(path)] == ["x", "y", "x"]


def test_bad_prompt_rows_name_file_and_row(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(
        DataError, match=r"p.jsonl:1: a conversation in 'messages' needs a tokenizer with a chat template"
    ):
        read_prompt_rows(path)
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"messages": "Hello"}) + "\n")
    with pytest.raises(
        DataError, match=r"p.jsonl:2: 'messages' must be a non-empty list of \{role, content\}"
    ):
        read_prompt_rows(path, tokenizer=tokenizer)
    path.write_text(json.dumps({"text": "Hello"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: missing field 'prompt' \(or 'messages'\)"):
        read_prompts(path)
    csv = tmp_path / "p.csv"  # a conversation as JSON in a CSV cell is text
    csv.write_text('messages\n"[{""role"": ""user"", ""content"": ""Hi""}]"\n')
    with pytest.raises(
        DataError, match=r"p.csv:1: 'messages' must be .* \(it is text, as a CSV cell always is: give"
    ):
        read_prompt_rows(csv, tokenizer=tokenizer)


def test_a_conversation_the_chat_template_refuses_names_its_row(tmp_path: Path, tokenizer) -> None:
    """Gemma's template raises on a system turn: a prompts file with one is one line naming the row, as SFT's
    demonstrations are, in every stage that reads prompts."""
    refusing = copy.deepcopy(tokenizer)
    refusing.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    path = tmp_path / "p.jsonl"
    system = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(system) + "\n")
    with pytest.raises(
        DataError,
        match=r"p.jsonl:2: the chat template cannot render these messages: System role not supported",
    ):
        read_prompt_rows(path, tokenizer=refusing)

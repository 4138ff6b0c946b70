"""Prompt files of the stages that sample answers (generate, PPO): `{"prompt": str}` or `{"messages": [...]}` rows
(or `{"prompt": [...]}`, TRL's conversational prompt-only rows, read as `messages`) from any source of
rlhf.data.sources (JSONL, JSON, Parquet, CSV, a saved `datasets` folder, a hub id).

A `messages` row is the conversation so far; it becomes the prompt text through the tokenizer's chat template
with the generation prompt appended (the assistant's turn is what gets sampled). A conversation that ends with
assistant turns (ultrafeedback_binarized's `messages`: the prompt and its answer) is cut before them, as the
preference readers cut one. Where a row has both (ultrafeedback_binarized again, whose `prompt` is the bare user
text), the conversation is the prompt, so that the policy samples after the text its reward model scored; a
reader without a tokenizer (the CAI stages) takes the `prompt` string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.data.preferences import Render, chat_template
from rlhf.data.sources import iter_rows
from rlhf.errors import DataError


def read_prompt_rows(
    source: str | Path, max_prompts: int = 0, tokenizer: Any = None
) -> list[tuple[str, str]]:
    """(prompt_id, prompt text) per row; the id is the row's `prompt_id` (or `id`), else "<source stem>:<row>".

    `messages` rows need a tokenizer with a chat template. Errors name source:row.
    """
    return [(row_id, text) for row_id, text, _ in _read(source, max_prompts, tokenizer)]


def read_prompt_conversations(
    source: str | Path, max_prompts: int = 0, tokenizer: Any = None
) -> list[tuple[str, list[dict[str, str]] | None]]:
    """(prompt text, the messages it renders) per row of `read_prompt_rows`; None for a `prompt` string. A stage
    that writes answers as demonstrations (bon) keeps the conversation, so that SFT renders the answer's turn
    with the chat template, end-of-turn token included."""
    return [(text, messages) for _, text, messages in _read(source, max_prompts, tokenizer)]


def _read(
    source: str | Path, max_prompts: int, tokenizer: Any
) -> list[tuple[str, str, list[dict[str, str]] | None]]:
    render = chat_template(tokenizer) if tokenizer is not None else None
    stem = Path(str(source)).stem
    prompts = []
    seen: dict[str, tuple[str, str]] = {}  # id -> (where, text): answers are filed under their prompt's id
    for where, row in iter_rows(source):
        given = row.get("prompt_id", row.get("id"))
        row_id = where.rsplit(":", 1)[1]
        text, messages = prompt_text(row, where, render), prompt_messages(row, where, render)
        prompt_id = str(given) if given is not None else f"{stem}:{row_id}"
        first = seen.setdefault(prompt_id, (where, text))
        if first[1] != text:
            raise DataError(f"{where}: prompt_id {prompt_id!r} is also the id of another prompt "
                            f"({first[0]}): give each prompt its own")  # fmt: skip
        prompts.append((prompt_id, text, messages))
        if max_prompts and len(prompts) == max_prompts:
            break
    if not prompts:
        raise DataError(f"{source}: no prompts (empty file)")
    return prompts


def read_prompts(source: str | Path, limit: int = 0, tokenizer: Any = None) -> list[str]:
    """The prompt texts of `read_prompt_rows`: the first `limit` (0: all)."""
    return [prompt for _, prompt in read_prompt_rows(source, limit, tokenizer)]


def prompt_text(row: dict[str, Any], where: str, render: Render | None) -> str:
    """The prompt of one row: its `messages` before their trailing assistant turns, rendered with a generation
    prompt, or its `prompt` string (where there is no `messages`, or no tokenizer to render them)."""
    messages = prompt_messages(row, where, render)
    if messages is not None and render is not None:
        try:
            return render(messages, True)
        except ValueError as e:  # the template refused them (chat_template says why)
            raise DataError(f"{where}: {e}") from None
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages')")
    if not isinstance(row["prompt"], str):
        raise DataError(f"{where}: field 'prompt' should be str, got {type(row['prompt']).__name__}")
    return row["prompt"]


def prompt_messages(row: dict[str, Any], where: str, render: Render | None) -> list[dict[str, str]] | None:
    """The conversation a row's prompt is: its `messages` (or a `prompt` list, TRL's conversational prompt-only
    rows) before their trailing assistant turns, as {role, content}; None where the prompt is its `prompt`
    string (no conversation, or no tokenizer to render `messages` beside it)."""
    key = conversation_key(row)
    if key is not None and not (key == "messages" and "prompt" in row and render is None):
        messages = row[key]
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            # a CSV cell is text: a conversation does not fit in one
            text = " (it is text, as a CSV cell always is: give conversations as JSONL, JSON or Parquet)"
            raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} objects"
                            + (text if isinstance(messages, str) else ""))  # fmt: skip
        if render is None:
            raise DataError(f"{where}: a conversation in {key!r} needs a tokenizer with a chat template")
        conversation = before_answer(messages)
        if not conversation:
            raise DataError(f"{where}: {key!r} holds only assistant turns: no prompt to answer")
        return [{"role": m["role"], "content": m["content"]} for m in conversation]
    return None


def conversation_key(row: dict[str, Any]) -> str | None:
    """The column holding a row's conversation: `messages`, or `prompt` where it is a list (TRL's conversational
    prompt-only rows); None where the prompt is text."""
    if isinstance(row.get("prompt"), list):
        return "prompt"
    return "messages" if "messages" in row else None


def before_answer(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation cut before its trailing assistant turns: the prompt they answer."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]

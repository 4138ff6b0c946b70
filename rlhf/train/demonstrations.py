"""SFT demonstrations, read and tokenized: the data of `rlhf sft` and of PPO's pretraining mix (ptx).

Rows, in the shapes TRL documents (docs/formats.md, "SFT demonstrations"):
  {"prompt": str, "completion": str}        prompt-completion; {"prompt", "response"} is read the same way
  {"prompt": [msgs], "completion": [msgs]}  conversational prompt-completion, rendered with the chat template
  {"messages": [msgs]}                      a conversation; the last assistant turn is the response
  {"text": str}                             plain text, all of it the response (no prompt)
Loss falls on response tokens only, each ending with EOS or the end-of-turn token. Other column names are read
through a mapping from our field to the data's column ({"prompt": "instruction", "completion": "output"}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf.data.layouts import rename_columns
from rlhf.data.sources import iter_rows, text_field
from rlhf.errors import DataError
from rlhf.models.tokens import chat_demonstration, encode_prompts, encode_responses, end_response, stop_ids
from rlhf.train.lm_loop import IGNORE, Example


def read_demonstrations(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, columns: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """(prompt, response) text pairs from the rows above, of any source of rlhf.data.sources (JSONL, JSON,
    Parquet, CSV, a saved `datasets` folder, a hub id), with source:row errors. A `text` row's prompt is "".
    `columns` renames the source's columns to ours first, as the preference readers do ({"prompt": "question"})."""
    pairs = []
    for where, row in iter_rows(path):
        row = rename_columns(row, columns or {}, where)
        if "messages" in row:  # before `prompt`: ultrafeedback_binarized's SFT split has both
            messages = _messages(row, "messages", where)
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: the last message must be the assistant's answer")
            pairs.append(_render(tokenizer, messages[:-1], messages[-1:], where))
        elif "text" in row:
            pairs.append(("", text_field(row, "text", where)))
        elif isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
            pairs.append(_conversational(tokenizer, row, where))
        else:
            pairs.append(_prompt_completion(row, where))
    if not pairs:
        raise DataError(f"{path}: no demonstrations (empty file)")
    return pairs


def demonstration_reply(row: dict[str, Any], where: str) -> tuple[str, str] | None:
    """(request, answer) of a row of any shape `read_demonstrations` takes, as written (not through a template):
    the last user message's content and the last message's (or the completion's last turn's), or the prompt
    and completion (response) strings; None for a `text` row, which has no answer apart from its prompt. A
    malformed row is the DataError `read_demonstrations` gives."""
    if "messages" in row:
        messages = _messages(row, "messages", where)
    elif "text" in row:
        text_field(row, "text", where)
        return None
    elif isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
        prompt, completion = _conversational_checked(row, where)
        messages = prompt + completion
    else:
        return _prompt_completion(row, where)
    content = messages[-1]["content"]
    if messages[-1]["role"] != "assistant" or not isinstance(content, str):
        raise DataError(f"{where}: the last message must be the assistant's answer, as text")
    asked = [m["content"] for m in messages[:-1] if m["role"] == "user" and isinstance(m["content"], str)]
    return (asked[-1] if asked else ""), content


def _prompt_completion(row: dict[str, Any], where: str) -> tuple[str, str]:
    """A prompt-completion row of strings. A missing field is named with every name it may have, beside the
    keys the row does have, so that a file of other column names shows what to map (`columns`)."""
    has = f"the row's keys are {', '.join(repr(k) for k in row)}" if row else "the row has no keys"
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages' or 'text'); {has}")
    reply = "completion" if "completion" in row else "response"
    if reply not in row:
        raise DataError(f"{where}: missing field 'completion' (or 'response'); {has}")
    return text_field(row, "prompt", where), text_field(row, reply, where)


def _conversational(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], where: str) -> tuple[str, str]:
    """A TRL conversational prompt-completion row: the completion's messages end with the assistant's turn."""
    prompt, completion = _conversational_checked(row, where)
    return _render(tokenizer, prompt, completion, where)


def _conversational_checked(
    row: dict[str, Any], where: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), list):
            raise DataError(f"{where}: 'prompt' and 'completion' should both be message lists or both be str")
    prompt, completion = _messages(row, "prompt", where), _messages(row, "completion", where)
    if completion[-1]["role"] != "assistant":
        roles = [m["role"] for m in completion]
        raise DataError(f"{where}: 'completion' should end with the assistant's turn, got roles {roles}")
    return prompt, completion


def _messages(row: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    messages = row[key]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: {key!r} must be a list of {{role, content}} objects")
    for i, m in enumerate(messages):  # content: text, or a list of parts (multimodal templates)
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str | list):
            shown = {k: m.get(k) for k in ("role", "content")}
            raise DataError(f"{where}: {key}[{i}] needs a 'role' and a 'content' string, got {shown}"[:300])
    return messages


def _render(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, Any]], reply: list[dict[str, Any]], where: str
) -> tuple[str, str]:
    try:
        return chat_demonstration(tokenizer, prompt, reply)
    except Exception as e:  # the template's own errors (jinja2 TemplateError, ValueError) name the problem
        raise DataError(f"{where}: the chat template cannot render these messages: {e}") from None


def tokenize_demonstrations(
    pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> tuple[list[Example], int, int]:
    """Prompt tokens carry no loss; the response and its EOS (or end-of-turn token) do.
    Returns (examples, n_truncated, n_dropped)."""
    if not pairs:
        return [], 0, 0
    prompts = encode_prompts(tokenizer, [p for p, _ in pairs])
    responses = encode_responses(tokenizer, [r for _, r in pairs])
    stops = stop_ids(tokenizer)
    examples, truncated, dropped = [], 0, 0
    for p, r in zip(prompts, responses, strict=True):
        r = end_response(r, stops)
        if len(p) + len(r) > max_len:
            truncated += 1
            if len(p) >= max_len:
                dropped += 1  # no room for a single response token
                continue
            r = r[: max_len - len(p)]
        examples.append({"input_ids": p + r, "labels": [IGNORE] * len(p) + r})
    return examples, truncated, dropped

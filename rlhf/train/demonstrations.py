"""SFT demonstrations, read and tokenized: the data of `rlhf sft` and of PPO's pretraining mix (ptx).

Rows are `{prompt, response}` or chat `{messages: [...]}` (rendered with the tokenizer's chat template; the last
assistant turn is the response). Loss falls on response tokens only, each ending with EOS or the end-of-turn token.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from rlhf.data.sources import iter_rows, text_field
from rlhf.errors import DataError
from rlhf.models.tokens import chat_demonstration, encode_prompts, encode_responses, end_response, stop_ids
from rlhf.train.lm_loop import IGNORE, Example


def read_demonstrations(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, str]]:
    """(prompt, response) text pairs from {prompt, response} or {messages} rows of any source of
    rlhf.data.sources (JSONL, JSON, Parquet, CSV, a saved `datasets` folder, a hub id), with source:row errors."""
    pairs = []
    for where, row in iter_rows(path):
        if "messages" in row:
            messages = row["messages"]
            if (
                not isinstance(messages, list)
                or not messages
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
            ):
                raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: the last message must be the assistant's answer")
            try:
                pairs.append(chat_demonstration(tokenizer, messages))
            except (
                Exception
            ) as e:  # the template's own errors (jinja2 TemplateError, ValueError) name the problem
                raise DataError(f"{where}: the chat template cannot render these messages: {e}") from None
        else:
            pairs.append((text_field(row, "prompt", where), text_field(row, "response", where)))
    if not pairs:
        raise DataError(f"{path}: no demonstrations (empty file)")
    return pairs


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
            if len(p) >= max_len - 1:
                dropped += 1  # no room for a single response token
                continue
            r = r[: max_len - len(p)]
        examples.append({"input_ids": p + r, "labels": [IGNORE] * len(p) + r})
    return examples, truncated, dropped

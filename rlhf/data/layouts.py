"""The layouts preference datasets come in, turned into the rows of our own formats (no torch, no datasets).

Each function takes one row (a dict) and returns a row in a format of preference_io (pairs, conversational,
ranking), or raises DataError "where: what is wrong". docs/formats.md shows an example of each layout.
  columns                  rename a dataset's columns to ours: {"prompt": "question", "chosen": "good"}
  conversational           TRL conversational; with an IMPLICIT prompt (no "prompt" list) the shared
                           conversation is cut off `chosen`/`rejected` at their last assistant turn
  ultrafeedback_binarized  HuggingFaceH4/ultrafeedback_binarized: as conversational, margin from the scores
  ultrafeedback            openbmb/UltraFeedback: an instruction and its rated completions -> a ranking
  ordered                  {"prompt", "completions"} listed best first -> a ranking without ties
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

from rlhf.errors import DataError

# The per-aspect ratings of raw UltraFeedback, averaged into one score per completion.
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def rename_columns(row: dict[str, Any], columns: dict[str, str], where: str) -> dict[str, Any]:
    """The row with each `columns[field]` column renamed to `field` (replacing a column of that name), all at
    once: {chosen: rejected, rejected: chosen} swaps the two, and two fields may read one column."""
    if not columns:
        return row
    for ours, theirs in columns.items():
        if theirs not in row:
            _fail(where, f"missing column {theirs!r} (the column mapping reads {ours!r} from it)")
    renamed = {k: v for k, v in row.items() if k not in set(columns.values())}
    return renamed | {ours: row[theirs] for ours, theirs in columns.items()}


def detect_layout(row: dict[str, Any]) -> str | None:
    """The layout of a row that the per-format detection of preference_io would not recognise, else None."""
    if "instruction" in row and isinstance(row.get("completions"), list) and "ranking" not in row:
        return "ultrafeedback"
    if {"chosen", "rejected"} <= row.keys() and {"score_chosen", "score_rejected"} <= row.keys():
        return "ultrafeedback_binarized"
    if {"chosen", "rejected"} <= row.keys() and not isinstance(row.get("prompt"), list):
        if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
            return "conversational"
    return None


def implicit_prompt(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A conversational row whose `chosen` and `rejected` are whole conversations: the messages before the
    last assistant turn of each become `prompt` (they must be the same), the rest the replies.

    A string `prompt` beside them is used (as one user turn) only when the conversations hold no prompt.
    """
    if isinstance(row.get("prompt"), list):
        return row  # explicit prompt
    cut: dict[str, tuple[list[Any], list[Any]]] = {}
    for key in ("chosen", "rejected"):
        messages = row.get(key)
        if not isinstance(messages, list):
            return row  # the format's own checks name what is wrong
        last = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
        if not last:
            _fail(where, f"field {key!r} has no assistant turn")
        cut[key] = (messages[: last[-1]], messages[last[-1] :])
    prompt = cut["chosen"][0]
    if prompt != cut["rejected"][0]:
        _fail(
            where,
            "'chosen' and 'rejected' have different prompts (the messages before their last assistant turn)",
        )
    if not prompt:
        if not isinstance(row.get("prompt"), str):
            _fail(where, "no prompt: 'chosen' starts with its assistant turn and there is no 'prompt' string")
        prompt = [{"role": "user", "content": row["prompt"]}]
    return {**row, "prompt": prompt, "chosen": cut["chosen"][1], "rejected": cut["rejected"][1]}


def ultrafeedback_binarized(row: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """(format, row): the pair (conversational when its replies are message lists), margin = the score gap."""
    scores = [row.get("score_chosen"), row.get("score_rejected")]
    for key, score in zip(("score_chosen", "score_rejected"), scores, strict=True):
        if score is not None and not _is_number(score):  # "8" would leave the pair without its margin
            _fail(where, f"field {key!r} should be a number, got {type(score).__name__}")
    if "margin" not in row and all(_is_number(s) for s in scores):
        if float(scores[0]) < float(scores[1]):  # type: ignore[arg-type]
            _fail(where, f"score_chosen ({scores[0]}) is below score_rejected ({scores[1]}): the labels contradict "
                  "the scores")  # fmt: skip
        row = {**row, "margin": float(scores[0]) - float(scores[1])}  # type: ignore[arg-type]
    if isinstance(row.get("chosen"), list):
        return "conversational", implicit_prompt(row, where)
    return "pairs", row


def ultrafeedback(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A ranking row from raw UltraFeedback: each completion's score is the mean of its numeric aspect
    ratings (`annotations`; "N/A" left out), else its `overall_score`; higher score, better rank; equal = tie."""
    if not isinstance(row.get("instruction"), str):
        _fail(where, "field 'instruction' should be str")
    texts, scores = [], []
    for i, c in enumerate(row["completions"]):
        if not isinstance(c, dict) or not isinstance(c.get("response"), str):
            _fail(where, f"completions[{i}] should be an object with a 'response' string")
        score = _aspect_mean(c.get("annotations"))
        score = c.get("overall_score") if score is None else score
        if not _is_number(score):
            _fail(where, f"completions[{i}] has no numeric aspect rating and no 'overall_score'")
        texts.append(c["response"])
        scores.append(float(score))  # type: ignore[arg-type]
    distinct = sorted(set(scores), reverse=True)
    return {
        "prompt": row["instruction"],
        "completions": texts,
        "ranking": [distinct.index(s) + 1 for s in scores],
    }


def ordered(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A ranking row from completions listed best first: ranks 1, 2, ..., K."""
    completions = row.get("completions")
    if not isinstance(completions, list):
        _fail(where, "field 'completions' should be a list (best first)")
    extra: dict[str, Any] = {k: row[k] for k in ("prompt", "labeler", "meta") if k in row}
    return {**extra, "completions": completions, "ranking": list(range(1, len(completions) + 1))}


def _aspect_mean(annotations: Any) -> float | None:
    if not isinstance(annotations, dict):
        return None
    ratings = []
    for aspect in ULTRAFEEDBACK_ASPECTS:
        value = annotations.get(aspect)
        if isinstance(value, list) and len(value) == 1:  # some exports wrap each aspect in a list
            value = value[0]
        rating = value.get("Rating") if isinstance(value, dict) else None
        try:
            ratings.append(float(rating))  # type: ignore[arg-type]
        except (TypeError, ValueError):  # "N/A" or absent
            continue
    return sum(ratings) / len(ratings) if ratings else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fail(where: str, msg: str) -> NoReturn:
    raise DataError(f"{where}: {msg}" if where else msg)

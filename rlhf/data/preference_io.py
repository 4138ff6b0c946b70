"""Preference records and their JSONL formats: reading, writing, validating (no torch here).

Formats, one JSON object per line (docs/formats.md shows an example of each):
  pairs           TRL standard        {"prompt", "chosen", "rejected", "margin"?, "labeler"?}
  conversational  TRL conversational  the same keys, holding lists of {"role", "content"} messages
  hh              Anthropic HH        {"chosen", "rejected"}: whole transcripts, prompt split at the last assistant turn
  vote            one A/B judgement   {"prompt", "completion_a", "completion_b", "choice", "labeler"?, "margin"?,
                                       "axes"? (read into meta), "meta"?}
  ranking         K-way ranking       {"prompt", "completions", "ranking", "labeler"?, "meta"?}; 1 = best, equal = tie
  rating          one score           {"prompt", "completion", "rating", "labeler"?, "meta"?}
  feedback        TRL unpaired (KTO)  {"prompt", "completion", "label": true | false, "labeler"?, "meta"?}: one
                                      answer judged good or bad (a thumbs up or down); prompt and completion may
                                      be messages, as in the conversational format
and the layouts of published datasets that rlhf.data.layouts turns into these: conversational with an implicit
prompt, ultrafeedback_binarized, ultrafeedback (raw, rated completions), ordered (completions best first).
Files, saved `datasets` folders and hub ids are opened by rlhf.data.sources.

Import from rlhf.data.preferences, which re-exports all of this next to the conversions between formats.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, cast, get_args

from rlhf.data import layouts
from rlhf.data.jsonl import write_jsonl
from rlhf.data.sources import iter_rows
from rlhf.errors import DataError

Choice = Literal["A", "B", "tie", "both_bad"]
Format = Literal[
    "auto", "pairs", "hh", "conversational", "ranking", "rating", "vote", "feedback",
    "ultrafeedback_binarized", "ultrafeedback", "ordered",
]  # fmt: skip

CHOICES: tuple[Choice, ...] = get_args(Choice)
AXIS_CHOICES = ("A", "B", "same")  # a vote's judgement on one axis (helpful, honest, ...)
HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Message:
    """One chat turn, as in TRL's conversational format."""

    role: str
    content: str


@dataclass
class PreferencePair:
    """TRL standard format: `chosen` is a better reply to `prompt` than `rejected`."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None  # how much better, when the source says
    labeler: str | None = None


@dataclass
class ConversationalPair:
    """TRL conversational format: `prompt` is the conversation so far, `chosen`/`rejected` the assistant turn(s).

    Kept as messages so that it round-trips exactly; `render_conversational` makes it a PreferencePair
    through the policy's chat template.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None
    labeler: str | None = None


@dataclass
class PairwiseVote:
    """One labeler's judgement of two completions; "tie" and "both_bad" are kept but make no pair."""

    prompt: str
    completion_a: str
    completion_b: str
    choice: Choice
    labeler: str | None = None
    margin: float | None = None  # optional strength/confidence
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. task id, policy versions


@dataclass
class Ranking:
    """K-way ranking: ranking[i] is the rank of completions[i]; 1 = best; equal ranks = tie."""

    prompt: str
    completions: list[str]
    ranking: list[int]
    labeler: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rating:
    """One labeler's score of one completion (higher = better)."""

    prompt: str
    completion: str
    rating: float
    labeler: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Feedback:
    """One answer judged good (`label` true) or bad, compared with nothing: TRL's unpaired preference format,
    which KTO trains on (a thumbs up or down). `prompt` and `completion` are text, or messages as in the
    conversational format (the completion starting with the assistant's turn)."""

    prompt: str | list[Message]
    completion: str | list[Message]
    label: bool
    labeler: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


log = logging.getLogger(__name__)

Record = PreferencePair | ConversationalPair | PairwiseVote | Ranking | Rating | Feedback


def read_preferences(
    path: str | Path, fmt: Format = "auto", skip_bad_rows: bool = False, columns: dict[str, str] | None = None
) -> list[Record]:
    """Every record of a preference source (a JSONL, JSON, Parquet or CSV file, a saved `datasets` folder or a
    hub id: rlhf.data.sources); "auto" detects each row's format from its keys; `columns` renames the
    source's columns to ours first ({"prompt": "question"}).

    Raises DataError "source:row: what is wrong" on the first malformed row, or with `skip_bad_rows` skips such
    rows and logs how many (and the first); raises on a source with no valid record.
    """
    skipped: list[str] | None = [] if skip_bad_rows else None
    records = [record for _, record in read_records(path, fmt, skipped, columns)]
    if skipped:
        log.warning("%s: skipped %d malformed rows (first: %s)", path, len(skipped), skipped[0])
    return records


def read_records(
    path: str | Path,
    fmt: Format = "auto",
    skipped: list[str] | None = None,
    columns: dict[str, str] | None = None,
) -> list[tuple[str, Record]]:
    """("source:row", record) for every valid row (see read_preferences); given a `skipped` list, the message of
    each malformed row goes there instead of being raised. A source with no valid record is a DataError."""
    records = []
    for where, obj in iter_rows(path, skipped):
        try:
            records.append(
                (where, record_from_json(layouts.rename_columns(obj, columns or {}, where), fmt, where))
            )
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    if not records:
        raise DataError(
            f"{path}: no records (empty file)"
            if not skipped
            else f"{path}: every row is malformed ({len(skipped)} rows; first: {skipped[0]})"
        )
    return records


def write_preferences(path: str | Path, records: Iterable[Record]) -> int:
    """Write records as JSONL, atomically, each in its own format; return how many were written.

    Each row is read back before anything is written, so a record that read_preferences would reject
    (a NaN margin, a ranking of the wrong length) raises DataError here instead.
    """
    rows = []
    for i, record in enumerate(records, start=1):
        row = record_to_json(record)
        record_from_json(row, "auto", f"{path}: record {i}")
        rows.append(row)
    return write_jsonl(path, rows)


def record_to_json(r: Record) -> dict[str, Any]:
    """The record as a JSON object in its own format; fields that are None, and an empty meta, are left out."""
    if not isinstance(r, PreferencePair | ConversationalPair | PairwiseVote | Ranking | Rating | Feedback):
        raise TypeError(f"not a preference record: {type(r).__name__}")
    # Field names are the JSON keys; asdict turns Messages into {"role", "content"} objects.
    return {k: v for k, v in asdict(r).items() if v is not None and v != {}}


def record_from_json(obj: Any, fmt: Format = "auto", where: str = "") -> Record:
    """One JSON object as a record of format `fmt` ("auto": detected from its keys); the dataset layouts
    (ultrafeedback_binarized, ultrafeedback, ordered, an implicit conversational prompt) go through
    rlhf.data.layouts first.

    Raises DataError "where: what is wrong"; `where` is "path:line" when reading a file.
    Unknown keys are ignored in the external formats (pairs, conversational, hh) and rejected in our own
    (vote, ranking, rating), which keep extra data under "meta".
    """
    if not isinstance(obj, dict):
        _fail(where, f"expected a JSON object, got {_json_type(obj)}")
    if fmt == "auto":
        fmt = cast(Format, layouts.detect_layout(obj)) or _detect(obj, where)
    if fmt == "ultrafeedback_binarized":
        fmt, obj = cast(tuple[Format, dict[str, Any]], layouts.ultrafeedback_binarized(obj, where))
    elif fmt == "ultrafeedback":
        fmt, obj = "ranking", layouts.ultrafeedback(obj, where)
    elif fmt == "ordered":
        fmt, obj = "ranking", layouts.ordered(obj, where)
    elif fmt == "conversational":
        obj = layouts.implicit_prompt(obj, where)
    if fmt == "pairs":
        return PreferencePair(
            _get(obj, "prompt", str, where),
            _get(obj, "chosen", str, where),
            _get(obj, "rejected", str, where),
            _margin(obj, where),
            _get(obj, "labeler", str, where, required=False),
        )
    if fmt == "conversational":
        return ConversationalPair(
            _messages(obj, "prompt", where),
            _reply(obj, "chosen", where),
            _reply(obj, "rejected", where),
            _margin(obj, where),
            _get(obj, "labeler", str, where, required=False),
        )
    if fmt == "hh":
        prompts, replies = [], []
        for key in ("chosen", "rejected"):
            try:
                prompt, reply = split_hh(_get(obj, key, str, where))
            except ValueError as e:
                _fail(where, f"field {key!r}: {e}")
            prompts.append(prompt)
            replies.append(reply)
        if prompts[0] != prompts[1]:
            _fail(
                where,
                "'chosen' and 'rejected' have different prompts (the text up to their last assistant turn)",
            )
        return PreferencePair(prompts[0], replies[0], replies[1])
    if fmt == "feedback":  # TRL's format: its datasets' other columns are ignored, as the pairs format's are
        label = _get(obj, "label", bool, where)
        chat = isinstance(obj.get("prompt"), list) or isinstance(obj.get("completion"), list)
        return Feedback(
            _messages(obj, "prompt", where) if chat else _get(obj, "prompt", str, where),
            _reply(obj, "completion", where) if chat else _get(obj, "completion", str, where),
            label,
            _get(obj, "labeler", str, where, required=False),
            _get(obj, "meta", dict, where, required=False) or {},
        )
    if fmt not in _OWN_KEYS:
        raise ValueError(f"unknown preference format {fmt!r}; expected one of {get_args(Format)}")

    unknown = sorted(set(obj) - _OWN_KEYS[fmt])
    if unknown:
        _fail(where, f"unknown field {unknown[0]!r} in a {fmt} record (extra data goes under 'meta')")
    prompt = _get(obj, "prompt", str, where)
    labeler = _get(obj, "labeler", str, where, required=False)
    meta = _get(obj, "meta", dict, where, required=False) or {}
    if fmt == "vote":
        choice = _get(obj, "choice", str, where)
        if choice not in CHOICES:
            _fail(where, f"unknown choice {choice!r} (expected one of {', '.join(CHOICES)})")
        a, b = _get(obj, "completion_a", str, where), _get(obj, "completion_b", str, where)
        margin = _margin(obj, where)
        axes = _get(obj, "axes", dict, where, required=False)
        if axes is not None:  # the labeling app's votes export: per-axis judgements, kept in meta
            bad = [k for k, v in axes.items() if v not in AXIS_CHOICES]
            if bad:
                _fail(
                    where,
                    f"axes[{bad[0]!r}] should be one of {', '.join(AXIS_CHOICES)}, got {axes[bad[0]]!r}",
                )
            meta = {**meta, "axes": axes}
        return PairwiseVote(prompt, a, b, cast(Choice, choice), labeler, margin, meta)
    if fmt == "ranking":
        completions = _get(obj, "completions", list, where)
        ranking = _get(obj, "ranking", list, where)
        if not all(isinstance(c, str) for c in completions):
            _fail(where, "field 'completions' should be a list of str")
        bad = [r for r in ranking if isinstance(r, bool) or not isinstance(r, int) or r < 1]
        if bad:
            _fail(where, f"field 'ranking' should hold positive integers (1 = best), got {bad[0]!r}")
        if len(ranking) != len(completions):
            _fail(where, f"'ranking' has {len(ranking)} ranks for {len(completions)} completions")
        if len(completions) < 2:
            _fail(where, f"a ranking needs at least 2 completions, got {len(completions)}")
        return Ranking(prompt, completions, ranking, labeler, meta)
    rating = _number(obj, "rating", where)
    assert rating is not None  # required, so _number raised if it was missing
    return Rating(prompt, _get(obj, "completion", str, where), rating, labeler, meta)


# Keys that pick a format in "auto" mode; a row whose keys touch two families is ambiguous.
_SIGNATURES: dict[Format, set[str]] = {
    "pairs": {"chosen", "rejected"},
    "vote": {"completion_a", "completion_b", "choice"},
    "ranking": {"completions", "ranking"},
    "rating": {"completion", "rating"},
}
_OWN_KEYS: dict[str, set[str]] = {
    "vote": {"prompt", "completion_a", "completion_b", "choice", "labeler", "margin", "axes", "meta"},
    "ranking": {"prompt", "completions", "ranking", "labeler", "meta"},
    "rating": {"prompt", "completion", "rating", "labeler", "meta"},
}


def _detect(obj: dict[str, Any], where: str) -> Format:
    if {
        "completion",
        "label",
    } <= obj.keys() and "rating" not in obj:  # a rating's keys, but judged, not scored
        return "feedback"
    matches = [fmt for fmt, keys in _SIGNATURES.items() if keys & obj.keys()]
    if len(matches) != 1:
        what = (
            f"ambiguous record (looks like {' and '.join(matches)})" if matches else "unknown record format"
        )
        _fail(where, f"{what}; keys seen: {sorted(obj)}")
    # an answer without its judgement: a feedback record's label may be what is missing, as much as a rating
    if matches[0] == "rating" and "rating" not in obj:
        _fail(
            where,
            f"missing field 'label' (true or false: feedback) or 'rating' (a number); keys seen: {sorted(obj)}",
        )
    if matches[0] == "pairs":
        if "prompt" not in obj:
            return "hh"
        if isinstance(obj["prompt"], list) or isinstance(obj.get("chosen"), list):
            return "conversational"
    return matches[0]


def _fail(where: str, msg: str) -> NoReturn:
    raise DataError(f"{where}: {msg}" if where else msg)


def _json_type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(
    obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, *, required: bool = True
) -> Any:
    """obj[key] checked for presence and type; None if optional and absent or null. A bool is no number."""
    if obj.get(key) is None and not required:
        return None
    if key not in obj:
        _fail(where, f"missing field {key!r}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        _fail(where, f"field {key!r} should be {names}, got {_json_type(value)}")
    return value


def _number(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> float | None:
    value = _get(obj, key, (int, float), where, required=required)
    if value is not None and not math.isfinite(value):
        _fail(where, f"field {key!r} should be a finite number, got {value}")
    return None if value is None else float(value)


def _margin(obj: dict[str, Any], where: str) -> float | None:
    """The optional margin: how much better the preferred answer is, so never below 0 (the labeling store
    refuses one below 0 too)."""
    margin = _number(obj, "margin", where, required=False)
    if margin is not None and margin < 0:
        _fail(
            where,
            f"field 'margin' should be 0 or more (how much better the preferred answer is), got {margin}",
        )
    return margin


def _messages(obj: dict[str, Any], key: str, where: str) -> list[Message]:
    value = _get(obj, key, list, where)
    if not value:
        _fail(where, f"field {key!r} is an empty list of messages")
    for i, m in enumerate(value):
        if not (
            isinstance(m, dict)
            and set(m) == {"role", "content"}
            and all(isinstance(v, str) for v in m.values())
        ):
            _fail(
                where, f"{key}[{i}] should be {{'role': str, 'content': str}} and nothing else, got {m!r:.80}"
            )
    return [Message(m["role"], m["content"]) for m in value]


def _reply(obj: dict[str, Any], key: str, where: str) -> list[Message]:
    """A conversational reply: messages that start with the assistant's turn (what the reward model scores)."""
    reply = _messages(obj, key, where)
    if reply[0].role != "assistant":
        _fail(
            where,
            f"field {key!r} should start with the assistant's turn, got roles {[m.role for m in reply]}",
        )
    return reply


def split_hh(transcript: str) -> tuple[str, str]:
    """Split an Anthropic HH transcript at its LAST "\\n\\nAssistant:" turn -> (prompt incl. that tag, reply).

    prompt + reply == transcript, so the split is lossless; the reply keeps its leading space.
    """
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"no {HH_ASSISTANT!r} turn in the transcript")
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]

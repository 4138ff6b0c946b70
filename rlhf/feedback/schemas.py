"""Input and output schemas of the JSON API (pydantic), kept apart from the table models.

Every string is bounded and checked for NUL bytes and lone surrogates (PostgreSQL stores neither),
so bad input is a 422, never a 500.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    model_validator,
)

MAX_NOTE_CHARS = 2000
MAX_TEXT_CHARS = 100_000
MAX_COMPLETIONS = 16
MAX_INT32 = 2**31 - 1

TaskKind = Literal["pairwise", "ranking", "rating"]
Choice = Literal["A", "B", "tie", "both_bad"]
Role = Literal["admin", "labeler"]
ExportFormat = Literal["votes", "pairs", "ranking", "rating", "axes", "sft"]
AxisJudgement = Literal["A", "B", "same"]
MAX_AXES = 8
MAX_GUIDELINES_CHARS = 20_000

# The largest body that text within these limits makes: 12 bytes a character at worst (a 4-byte UTF-8
# character percent-encoded by a form, %F0%9F%98%80, or escaped in JSON as a surrogate pair,
# \ud83d\ude00), plus room for the other fields. Votes and project settings take bodies this large whatever
# the general body limit, so a text the pages or the API let a person write is never refused for its size.
BYTES_PER_CHAR = 12
OTHER_FIELDS_BYTES = 16 * 1024
MAX_VOTE_BYTES = BYTES_PER_CHAR * (MAX_TEXT_CHARS + MAX_NOTE_CHARS) + OTHER_FIELDS_BYTES
MAX_PROJECT_BYTES = BYTES_PER_CHAR * MAX_GUIDELINES_CHARS + OTHER_FIELDS_BYTES

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
PROJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
KEY_PATTERN = r"^[A-Za-z0-9_.:-]{8,128}$"


NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL characters


def _no_surrogates(value: str) -> str:
    """Lone UTF-16 surrogates (valid JSON escapes, but not Unicode) become U+FFFD, as UTF-8 decoders do."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)


def _clean_json(value: Any) -> Any:
    """_no_surrogates applied to every string (keys too) of a JSON value; a number that is not finite (NaN,
    Infinity, or one too large for a float, as 1e999) is refused: strict JSON has none, and PostgreSQL's JSON
    columns reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite (no NaN or Infinity, none beyond the float range)")
    if isinstance(value, str):
        return _no_surrogates(value)
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    if isinstance(value, dict):
        return {_no_surrogates(k): _clean_json(v) for k, v in value.items()}
    return value


def _text(min_length: int = 0, max_length: int = MAX_TEXT_CHARS) -> Any:
    return Field(min_length=min_length, max_length=max_length, pattern=NO_NUL)


# Bounded strings that PostgreSQL and SQLite can both store.
LongText = Annotated[str, _text(), AfterValidator(_no_surrogates)]
PromptText = Annotated[str, _text(1), AfterValidator(_no_surrogates)]
NoteText = Annotated[str, _text(0, MAX_NOTE_CHARS), AfterValidator(_no_surrogates)]
Label = Annotated[str, _text(0, 128), AfterValidator(_no_surrogates)]
ExternalId = Annotated[str, _text(1, 128), AfterValidator(_no_surrogates)]
Password = Annotated[str, _text(8, 256), AfterValidator(_no_surrogates)]

UserName = Annotated[str, Field(pattern=NAME_PATTERN)]
ProjectName = Annotated[str, Field(pattern=PROJECT_PATTERN)]
Finite = Annotated[float, Field(allow_inf_nan=False, ge=-1e9, le=1e9)]
Meta = Annotated[dict[str, Any], Field(max_length=64), AfterValidator(_clean_json)]
Axis = Annotated[
    str, Field(pattern=r"^[a-z][a-z_]{0,31}$", description="a judgement axis: helpful, honest, ...")
]
Axes = Annotated[list[Axis], Field(max_length=MAX_AXES)]
Guidelines = Annotated[str, _text(0, MAX_GUIDELINES_CHARS), AfterValidator(_no_surrogates)]


# ---- errors -------------------------------------------------------------------------------------------


class ErrorOut(BaseModel):
    detail: str


# Error answers every JSON API route may give; documented so clients (and schemathesis) know them.
API_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no credentials, or a wrong or revoked token"},
    403: {
        "model": ErrorOut,
        "description": "disabled account, wrong role, or missing CSRF header (cookie auth)",
    },
    404: {"model": ErrorOut, "description": "no such object, or not yours to see"},
    409: {
        "model": ErrorOut,
        "description": "conflicts with the stored state (already voted, exists, too late)",
    },
    413: {"model": ErrorOut, "description": "request body over the size limit"},
    429: {"model": ErrorOut, "description": "over the per-labeler vote rate limit (see Retry-After)"},
}


# ---- import -------------------------------------------------------------------------------------------


def _json_number(value: object) -> object:
    """A JSON number as it came: a string or a boolean is refused, not read as a number (13.0 is 13, as JSON
    Schema's integers allow)."""
    if isinstance(value, bool | str):
        raise ValueError("Input should be a number, not a string or a boolean")
    return value


# The JSON API's numbers and flags are taken as JSON types only: a string or a boolean where a number is asked
# for (or a number or string where a flag is) is a 422, not read as one.
Overlap = Annotated[int, Field(ge=1, le=100), BeforeValidator(_json_number)]
GoldRate = Annotated[float, Field(ge=0, le=1), BeforeValidator(_json_number)]


class SamplingIn(BaseModel):
    """Sampling parameters of a completion; extra keys are kept as given."""

    model_config = ConfigDict(extra="allow")
    temperature: Finite | None = None
    top_p: Finite | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_INT32)] | None = None
    max_new_tokens: Annotated[int, Field(ge=0, le=MAX_INT32)] | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _clean_extra(self) -> SamplingIn:
        if self.__pydantic_extra__:
            self.__pydantic_extra__ = _clean_json(self.__pydantic_extra__)
        return self


class CompletionIn(BaseModel):
    text: LongText
    policy: Label = ""
    sampling: SamplingIn = Field(default_factory=SamplingIn)


class CandidateRow(BaseModel):
    """One line of the candidate-generation file: a prompt and its K sampled completions."""

    prompt: PromptText
    prompt_id: ExternalId | None = None
    completions: Annotated[list[CompletionIn], Field(min_length=1, max_length=MAX_COMPLETIONS)]
    meta: Meta = Field(default_factory=dict)
    pairs: Annotated[list[tuple[int, int]], Field(max_length=MAX_COMPLETIONS**2)] | None = Field(
        None, description="pairwise tasks for exactly these completion pairs (i, j); default: the importer's"
    )

    @model_validator(mode="after")
    def _pairs_in_range(self) -> CandidateRow:
        for i, j in self.pairs or []:
            if not (0 <= i < len(self.completions) and 0 <= j < len(self.completions)) or i == j:
                raise ValueError(
                    f"pair ({i}, {j}) does not name two of the {len(self.completions)} completions"
                )
        return self


class GoldRow(BaseModel):
    """A vote-format row whose `choice` is the known correct answer."""

    prompt: PromptText
    completion_a: LongText
    completion_b: LongText
    choice: Literal["A", "B"]
    prompt_id: ExternalId | None = None
    meta: Meta = Field(default_factory=dict)

    @model_validator(mode="after")
    def _answers_differ(self) -> GoldRow:
        if self.completion_a == self.completion_b:  # as candidate pairs of one text: nothing to judge
            raise ValueError(
                "completion_a and completion_b are the same text: no answer can be the right one"
            )
        return self


class ImportIn(BaseModel):
    task_kind: TaskKind = "pairwise"
    candidates: Annotated[list[CandidateRow], Field(max_length=200_000)]
    gold: Annotated[list[GoldRow], Field(max_length=100_000)] = []
    overlap: Overlap | None = None
    gold_rate: GoldRate | None = None
    guidelines: Guidelines | None = Field(None, description="Markdown shown to labelers with every task")
    axes: Axes | None = Field(None, description="judgement axes asked beside the overall choice (pairwise)")


class ImportOut(BaseModel):
    project: str
    prompts: int
    completions: int
    tasks: int
    gold_tasks: int
    skipped: int = Field(description="rows whose prompt_id the project already holds")


# ---- projects and users -------------------------------------------------------------------------------

# An admin's request names only fields there are: a mistyped one ("overlapp", "label" for a token's name) is a 422,
# not a request that quietly leaves the setting as it was.
ADMIN_BODY = ConfigDict(extra="forbid")


class ProjectIn(BaseModel):
    model_config = ADMIN_BODY
    name: ProjectName
    overlap: Overlap = 1
    gold_rate: GoldRate = 0.0


class ProjectUpdate(BaseModel):
    model_config = ADMIN_BODY
    overlap: Overlap | None = None
    gold_rate: GoldRate | None = None
    guidelines: Guidelines | None = Field(None, description="Markdown shown to labelers with every task")
    axes: Axes | None = Field(None, description="judgement axes asked beside the overall choice (pairwise)")


class ProjectOut(BaseModel):
    name: str
    overlap: int
    gold_rate: float
    n_tasks: int
    n_gold_tasks: int
    n_votes: int
    guidelines: str | None = None
    axes: list[str] = []
    production: bool = False
    created_at: datetime


class UserIn(BaseModel):
    model_config = ADMIN_BODY
    name: UserName
    role: Role = "labeler"
    password: Password | None = None


class UserUpdate(BaseModel):
    model_config = ADMIN_BODY
    disabled: StrictBool | None = None  # "yes" or 1 is refused, not read as true
    role: Role | None = None
    password: Password | None = None


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    name: str
    role: str
    disabled: bool
    created_at: datetime


class TokenIn(BaseModel):
    model_config = ADMIN_BODY
    name: Label = ""


class TokenOut(BaseModel):
    user: str
    token: str = Field(description="bearer token; shown once, only its hash is stored")


# ---- tasks and votes ----------------------------------------------------------------------------------


class CompletionOut(BaseModel):
    position: int = Field(description="canonical position: 0 is answer A, 1 is B, ...")
    text: str


class TaskOut(BaseModel):
    """A task as a labeler sees it: no policy versions, no gold fields."""

    id: int
    project: str
    kind: TaskKind
    prompt: str
    completions: list[CompletionOut]
    display_order: list[int] = Field(description="a random order to show the completions in (positions)")


class TaskAdminOut(TaskOut):
    is_gold: bool
    gold_choice: str | None
    policies: list[str]
    n_assigned: int


class ProgressOut(BaseModel):
    done: int
    total: int


class NextTaskOut(BaseModel):
    task: TaskOut | None = Field(description="null when nothing is left for you")
    progress: ProgressOut | None


class VoteIn(BaseModel):
    """A vote as the JSON API takes it: numbers as JSON numbers, and no key it does not know (a misspelt
    `ratting` is a 422, not a vote without its rating). The task page's form is read into one (pages_label)."""

    model_config = ConfigDict(extra="forbid")

    task_id: Annotated[int, Field(ge=1, le=MAX_INT32), BeforeValidator(_json_number)]
    project: Annotated[str, Field(pattern=PROJECT_PATTERN)] | None = Field(
        None, description="the project the task must belong to: a task of another project is answered 404"
    )
    choice: Choice | None = Field(None, description="pairwise tasks: A, B, tie or both_bad")
    ranking: (
        Annotated[
            list[Annotated[int, Field(ge=1, le=MAX_COMPLETIONS), BeforeValidator(_json_number)]],
            Field(max_length=MAX_COMPLETIONS),
        ]
        | None
    ) = Field(None, description="ranking tasks: rank of each completion by position, 1 = best, equal = tie")
    rating: Annotated[Finite, BeforeValidator(_json_number)] | None = Field(
        None, description="rating tasks: the score given"
    )
    margin: (
        Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False), BeforeValidator(_json_number)] | None
    ) = None
    confidence: (
        Annotated[float, Field(ge=0, le=1, allow_inf_nan=False), BeforeValidator(_json_number)] | None
    ) = None
    note: NoteText | None = None
    axes: Annotated[dict[Axis, AxisJudgement], Field(max_length=MAX_AXES)] | None = Field(
        None, description="pairwise tasks: per judgement axis of the project, which answer is better"
    )
    rewrite: Annotated[str, _text(1, MAX_TEXT_CHARS), AfterValidator(_no_surrogates)] | None = Field(
        None, description="a better answer written by the labeler (exported as SFT data)"
    )
    display_order: (
        Annotated[
            list[Annotated[int, Field(ge=0, le=MAX_COMPLETIONS), BeforeValidator(_json_number)]],
            Field(max_length=MAX_COMPLETIONS),
        ]
        | None
    ) = Field(None, description="positions in the order they were shown, left to right")
    time_to_vote_ms: Annotated[int, Field(ge=0, le=86_400_000), BeforeValidator(_json_number)] | None = None
    idempotency_key: Annotated[str, Field(pattern=KEY_PATTERN)] = Field(
        description="client-chosen; a retry with the same key returns the original vote"
    )
    source: Literal["api", "simulated"] = "api"  # "production" votes come only from the model server


class VoteOut(BaseModel):
    id: int
    task_id: int
    labeler: str
    choice: str | None
    ranking: list[int] | None
    rating: float | None
    margin: float | None
    confidence: float | None
    note: str | None
    display_order: list[int] | None
    time_to_vote_ms: int | None
    axes: dict[str, str] | None = None
    rewrite: str | None = None
    source: str
    idempotency_key: str
    created_at: datetime
    retracted: bool


# ---- statistics ---------------------------------------------------------------------------------------


class LabelerStats(BaseModel):
    labeler: str
    disabled: bool
    votes: int
    agreement: float | None = Field(description="share of pairwise choices equal to another labeler's")
    agreement_pairs: int
    gold_accuracy: float | None
    gold_votes: int
    median_time_ms: float | None


class AxisStats(BaseModel):
    axis: str
    judged: int = Field(description="live pairwise votes that judged this axis")
    a: int
    b: int
    same: int
    agrees_with_choice: float | None = Field(
        description="share of the axis' A/B judgements that pick the answer the overall choice picked"
    )


class DayCount(BaseModel):
    day: str
    votes: int


class StatsOut(BaseModel):
    project: str
    tasks: int
    votes: int
    alpha: float | None = Field(description="Krippendorff's alpha (nominal) over pairwise choices")
    labelers: list[LabelerStats]
    axes: list[AxisStats] = []
    votes_per_day: list[DayCount] = Field([], description="live votes by UTC day, oldest first")

"""A constitution: the principles that AI feedback critiques, revises and compares answers by.

Each principle, as in Constitutional AI (Bai et al. 2022, https://arxiv.org/abs/2212.08073, appendix C),
carries a critique request and a revision request (supervised stage: the model criticises its own answer
and rewrites it) and a comparison question (RL stage: a judge picks the better of two answers). A YAML file
holds a list of them under `principles`; `load_constitution` checks it and names the file and entry of
anything wrong.

A principle may name the prompts it applies to (`applies_to`: regular expressions searched in the prompt,
case-insensitively, any one enough; absent = every prompt), as CAI pipelines route requests to principle
sets: a harm principle is then never asked of an insult, where the right answer is a polite reply, not a
refusal. The routing reads only the prompt's words, nothing a gold label knows. A prompt no principle applies
to gets no critique and no AI label.
"""

from __future__ import annotations

import difflib
import random
import re
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from rlhf.errors import ConfigError, read_yaml

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class Principle(BaseModel):
    """One principle of a constitution."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_\-]+$")] = Field(
        description="short name, recorded with every critique and AI label (lower case, digits, _ and -)"
    )
    principle: Text = Field(description="what the principle asks of an answer, in one sentence")
    critique_request: Text = Field(description="asks the model to criticise an answer under the principle")
    revision_request: Text = Field(description="asks the model to rewrite the answer to meet the critique")
    comparison: Text = Field(description="the question a judge answers about two answers, e.g. 'Which ...?'")
    weight: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="how often the principle is drawn, relative to the others (at most 1e6)",
    )
    applies_to: list[Text] | None = Field(
        None, min_length=1,
        description="regular expressions, searched in the prompt case-insensitively: the principle is drawn "
                    "only for prompts one of them matches (unset = every prompt)",
    )  # fmt: skip

    @field_validator("applies_to")
    @classmethod
    def _compiles(cls, patterns: list[str] | None) -> list[str] | None:
        for i, pattern in enumerate(patterns or []):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pattern {i} {pattern!r} is not a regular expression ({e})") from None
        return patterns

    def applies(self, prompt: str) -> bool:
        """Whether the principle applies to `prompt` (always when `applies_to` is unset)."""
        return self.applies_to is None or any(
            re.search(pattern, prompt, flags=re.IGNORECASE) for pattern in self.applies_to
        )


class Constitution(BaseModel):
    """A list of principles with distinct ids."""

    model_config = ConfigDict(extra="forbid")

    principles: list[Principle] = Field(min_length=1, description="the principles")

    @model_validator(mode="after")
    def _distinct_ids(self) -> Constitution:
        seen: set[str] = set()
        for i, p in enumerate(self.principles):
            if p.id in seen:
                raise ValueError(f"principles.{i}.id: duplicate id {p.id!r}")
            seen.add(p.id)
        return self

    def get(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise ConfigError(f"no principle {principle_id!r} in the constitution")

    def applicable(self, prompt: str) -> list[Principle]:
        """The principles that apply to `prompt`, in the file's order."""
        return [p for p in self.principles if p.applies(prompt)]

    def draw(self, rng: random.Random) -> Principle:
        """One principle, drawn by weight (Bai et al. draw one at random for each critique and comparison)."""
        return rng.choices(self.principles, weights=[p.weight for p in self.principles])[0]

    def draw_for(self, prompt: str, rng: random.Random) -> Principle | None:
        """One principle among those that apply to `prompt`, drawn by weight; None if none applies."""
        pool = self.applicable(prompt)
        return rng.choices(pool, weights=[p.weight for p in pool])[0] if pool else None


def find_constitution(path: str | Path) -> Path:
    """`path` where it is a file; a `configs/NAME` missing there (the default, the docs' examples) is the file of
    that name in this source checkout or, installed from a wheel, the copy shipped in the package (rlhf/_configs),
    so that they work from any directory."""
    p = Path(path)
    if p.is_file() or p.is_absolute() or p.parts[:1] != ("configs",):
        return p
    package = Path(__file__).parent  # rlhf/
    for candidate in (package.parent / p, package / "_configs" / p.relative_to("configs")):
        if candidate.is_file():
            return candidate
    return p


def load_constitution(path: str | Path) -> Constitution:
    """Read and check a constitution YAML file; a ConfigError of one line naming file and entry if it is bad."""
    p = Path(path)
    tree = read_yaml(p, "constitution file")
    try:
        return Constitution.model_validate(tree)
    except ValidationError as e:
        errors = e.errors()
        # a misspelled key is also a missing one: name the misspelling, the cause
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        where = ".".join(str(x) for x in err["loc"]) or "file"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(err["loc"][-1]), list(Principle.model_fields), n=1)
            msg = "unknown key" + (f" (did you mean {near[0]}?)" if near else "")
        if where.startswith("principles.") and isinstance(tree, dict):
            parts = where.split(".")
            entries = tree.get("principles") or []
            if len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < len(entries):
                entry = entries[int(parts[1])]
                if isinstance(entry, dict) and entry.get("id"):
                    where += f" (id {entry['id']!r})"
        if msg.startswith("principles."):  # a model-level check names its own entry
            where, msg = msg.split(": ", 1)
        raise ConfigError(f"{p}: {where}: {msg}") from None

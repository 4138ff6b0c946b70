"""Python reward functions beside a reward model, or instead of one: rules and verifiers (a maths answer checked,
a format required, a length budget). They are called as TRL's GRPOTrainer calls its `reward_funcs`, so one
written for TRL works here unchanged:

    def reward(prompts, completions, completion_ids, **columns) -> list[float | None]

- `prompts`: each answer's prompt as its row gives it: the `prompt` string, or the `messages` (or `prompt`) list
  (before any trailing assistant turns, as the policy was prompted);
- `completions`: each answer's text, or [{"role": "assistant", "content": text}] where the prompt is a list;
- `completion_ids`: each answer's token ids (its EOS or end-of-turn token left out);
- `columns`: every other column of the prompt rows (say `answer`), one value per answer, None where a row
  lacks it.

A function returns one number per answer, or None where it has no opinion (it adds 0 there). An answer's score is
the reward model's (if any) plus each function's value times its weight.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rlhf.data.prompts import before_answer, conversation_key
from rlhf.data.sources import iter_rows
from rlhf.errors import ConfigError, RlhfError

RewardFunction = Callable[..., Sequence[float | None]]
_PROMPT_KEYS = ("prompt", "messages")


def load_reward_function(spec: str) -> RewardFunction:
    """The function `spec` names: "package.module:name", or "path/to/file.py:name"."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"ppo.reward_functions: {spec!r} should be 'module:function' or 'file.py:function'")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"ppo.reward_functions: {spec!r}: no file {where}")
            module_spec = importlib.util.spec_from_file_location(f"rlhf_reward_{path.stem}", path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        raise ConfigError(
            f"ppo.reward_functions: {spec!r} could not be imported: {type(e).__name__}: {e}"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"ppo.reward_functions: {where} has no function {name!r}")
    return function


def prompt_rows(source: str, columns: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The rows of a prompts file, in its order (the order `read_prompts` gives), each with every column of the
    file and of `columns` (None where it lacks one): a function that names a column gets it whatever rows a
    batch, or a process's share of the guard's prompts, happens to hold."""
    rows = [row for _, row in iter_rows(source)]
    names = ({key for row in rows for key in row} | set(columns)) - set(_PROMPT_KEYS)
    return [{**dict.fromkeys(sorted(names)), **row} for row in rows]


class RewardFunctions:
    """The configured reward functions, called on a batch of answers with their prompts' rows."""

    def __init__(self, specs: Sequence[str], weights: Sequence[float] | None = None) -> None:
        self.specs = list(specs)
        self.functions = [load_reward_function(spec) for spec in specs]
        self.weights = [1.0] * len(specs) if weights is None else list(weights)
        # two functions of one name (reward in a.py and in b.py) are logged apart: NAME, NAME_2, ... (a suffix
        # another function's own name already holds is passed over)
        self.names: list[str] = []
        for function, spec in zip(self.functions, specs, strict=True):
            name = unique = getattr(function, "__name__", spec)
            n = 1
            while unique in self.names:
                n += 1
                unique = f"{name}_{n}"
            self.names.append(unique)

    def __bool__(self) -> bool:
        return bool(self.functions)

    def __call__(
        self, rows: Sequence[dict[str, Any]], texts: Sequence[str], ids: Sequence[Sequence[int]]
    ) -> tuple[list[float], dict[str, float]]:
        """Each answer's weighted sum of the functions' values, and each function's mean value over the answers
        (None counted as 0), by the function's name. `rows[i]` is answer i's prompt row."""
        # a conversation as the policy answered it (without the answer a row's `messages` may end with): a
        # `prompt` list (TRL's conversational rows), or `messages` where no `prompt` string is beside them
        keys = [conversation_key(row) for row in rows]
        chat = [
            key is not None and not isinstance(row.get("prompt"), str)
            for key, row in zip(keys, rows, strict=True)
        ]
        prompts = [
            before_answer(row[key]) if key is not None and c else row.get("prompt")
            for row, key, c in zip(rows, keys, chat, strict=True)
        ]
        completions = [
            [{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat, strict=True)
        ]
        columns = sorted({key for row in rows for key in row if key not in _PROMPT_KEYS})
        kwargs = {key: [row.get(key) for row in rows] for key in columns}
        totals, means = [0.0] * len(texts), {}
        for spec, name, function, weight in zip(
            self.specs, self.names, self.functions, self.weights, strict=True
        ):
            values = self._call(spec, function, prompts, completions, [list(i) for i in ids], kwargs)
            means[name] = sum(v for v in values if v is not None) / max(len(values), 1)
            for n, value in enumerate(values):
                if value is not None:
                    totals[n] += weight * value
        return totals, means

    @staticmethod
    def _call(spec: str, function: RewardFunction, prompts: list[Any], completions: list[Any],
              ids: list[list[int]], kwargs: dict[str, list[Any]]) -> list[float | None]:  # fmt: skip
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(function))
        named = {p.name for p in _parameters(function)}
        given = {**kwargs, "prompts": prompts, "completions": completions, "completion_ids": ids}
        given = given if takes_any else {k: v for k, v in given.items() if k in named}
        try:
            returned = function(**given)
        except Exception as e:
            raise RlhfError(f"reward function {spec} raised {type(e).__name__}: {e}") from None
        if hasattr(returned, "tolist"):  # a tensor or an array, as TRL takes them
            returned = returned.tolist()
        if isinstance(returned, str) or not isinstance(returned, Iterable):
            raise RlhfError(f"reward function {spec} returned {returned!r}: a list of one value per answer")
        values = list(returned)
        if len(values) != len(completions):
            raise RlhfError(
                f"reward function {spec} returned {len(values)} values for {len(completions)} answers"
            )
        for n, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(value):  # a bool is 1 or 0
                raise RlhfError(
                    f"reward function {spec} returned {value!r} for answer {n}: a finite number or None"
                )
            values[n] = float(value)
        return values


def _parameters(function: RewardFunction) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: give it everything
        return [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]

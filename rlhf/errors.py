"""Errors a user can fix. The CLI prints them as one line and exits non-zero; anything else is a bug."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


class RlhfError(Exception):
    """Base class: the message is one line that names what is wrong."""


class ConfigError(RlhfError):
    """A config key is unknown, has the wrong type, or holds an impossible value."""


class DataError(RlhfError):
    """A data file is missing, empty or malformed (the message names file:line)."""


@contextmanager
def from_setting(name: str) -> Iterator[None]:
    """Errors raised inside name the setting whose value they are about: "ppo.reward_model: runs/reward/final: no
    such directory", where a default nobody set would otherwise appear from nowhere."""
    try:
        yield
    except RlhfError as e:
        raise type(e)(f"{name}: {e}") from None


def read_yaml(path: str | Path, missing: str, error: type[RlhfError] = ConfigError) -> Any:
    """The YAML (or JSON, which YAML reads too) at `path`, None for an empty file. A missing file raises
    ConfigError "{missing} not found: PATH"; a file that does not parse raises `error` "PATH: not valid YAML (...)".
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{missing} not found: {p}")
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except UnicodeDecodeError as e:  # an image or a checkpoint given for the YAML
        raise error(f"{p}: not valid YAML (not UTF-8 text at byte {e.start + 1})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{where}: not valid YAML ({problem})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader for which a key given twice in one mapping is an error: YAML would keep the last silently
    (a second `principles:` list replacing the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            # `<<: *base` merges another mapping, whose keys this one may give again, by design
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)

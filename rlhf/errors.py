"""Errors a user can fix. The CLI prints them as one line and exits non-zero; anything else is a bug."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class RlhfError(Exception):
    """Base class: the message is one line that names what is wrong."""


class ConfigError(RlhfError):
    """A config key is unknown, has the wrong type, or holds an impossible value."""


class DataError(RlhfError):
    """A data file is missing, empty or malformed (the message names file:line)."""


def read_yaml(path: str | Path, missing: str, error: type[RlhfError] = ConfigError) -> Any:
    """The YAML (or JSON, which YAML reads too) at `path`, None for an empty file. A missing file raises
    ConfigError "{missing} not found: PATH"; a file that does not parse raises `error` "PATH: not valid YAML (...)".
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{missing} not found: {p}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None

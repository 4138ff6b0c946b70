"""Errors a user can fix. The CLI prints them as one line and exits non-zero; anything else is a bug."""


class RlhfError(Exception):
    """Base class: the message is one line that names what is wrong."""


class ConfigError(RlhfError):
    """A config key is unknown, has the wrong type, or holds an impossible value."""


class DataError(RlhfError):
    """A data file is missing, empty or malformed (the message names file:line)."""

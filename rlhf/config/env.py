"""Settings read from the environment, overridable in code: the labeling app's (RLHF_LABEL_*), the model
server's (RLHF_SERVE_*) and the A/B feedback gateway's (RLHF_GATEWAY_*)."""

from __future__ import annotations

import os
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError

from rlhf.errors import ConfigError

S = TypeVar("S", bound="EnvSettings")


class EnvSettings(BaseModel):
    """Settings read from environment variables named `env_prefix` + the field's name in upper case."""

    model_config = {"frozen": True}
    env_prefix: ClassVar[str]
    label: ClassVar[str]  # names the settings in errors

    @classmethod
    def from_env(cls: type[S], **overrides: Any) -> S:
        """Settings from the environment; keyword overrides that are not None win. A bad value is a one-line
        ConfigError naming the setting and its variable."""
        values: dict[str, Any] = {n: os.environ[cls.env_prefix + n.upper()] for n in cls.model_fields
                                  if cls.env_prefix + n.upper() in os.environ}  # fmt: skip
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            variable = f"{cls.env_prefix}{field.upper()}"
            where = f"{cls.label} setting {field} ({variable})" if field else f"{cls.label} settings"
            raise ConfigError(f"{where}: {err['msg']}") from None

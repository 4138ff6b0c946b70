"""Settings of the model server, read from the environment (RLHF_SERVE_<FIELD>), overridable in code.

`rlhf serve` passes its options as overrides; `uvicorn rlhf.serve.main:app` reads only the environment.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from rlhf.errors import ConfigError

ENV_PREFIX = "RLHF_SERVE_"


class Settings(BaseModel):
    """Every field can be set by an environment variable named RLHF_SERVE_<FIELD> (upper case)."""

    model_config = {"frozen": True}

    model_dir: str = Field(
        "runs/demo/sft/final",
        description="Policy to serve: a model dir, a PEFT LoRA adapter dir, or a hub id",
    )
    model_name: str | None = Field(
        None, description="Model id clients ask for (default: the last two parts of model_dir)"
    )
    candidate_model: str | None = Field(
        None, description="Second policy for A/B pairs (current vs candidate); also served by its own id"
    )
    candidate_name: str | None = Field(None, description="Model id of the candidate (default: from its dir)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Weights and compute dtype")
    device: str = Field(
        "auto", description="torch device: auto (cuda when there is one, else cpu), cpu, cuda:0..."
    )
    threads: int = Field(
        1,
        ge=0,
        description="torch CPU threads (0 = torch's default): 1 suits small models, whose batches gain more "
        "than their matmuls would from splitting; raise it for a big model on an otherwise idle CPU",
    )
    host: str = Field("127.0.0.1", description="Interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most sequences decoded together in one step")
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="When idle, how long a first request waits for others to batch with"
    )
    max_queue: int = Field(1024, ge=1, description="Most sequences waiting for a slot (429 beyond it)")
    max_n: int = Field(8, ge=1, le=128, description="Most choices per request (n, times prompts)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted (413 beyond)")
    feedback_db: str | None = Field(
        None, description="Feedback store URL (sqlite:///FILE or postgresql://...) for A/B votes; unset = off"
    )
    feedback_project: str = Field(
        "production", description="Project of the feedback store that holds production A/B pairs"
    )
    ab_rate: float = Field(
        0.0, ge=0, le=1, description="Share of opted-in requests answered with an A/B pair"
    )
    feedback_per_minute: int = Field(
        30,
        ge=0,
        description="Limit on new A/B votes per minute, per end user and per client address (429 beyond it); 0 = off",
    )
    seed: int = Field(0, description="Seed of the server's own randomness (unseeded sampling, A/B draws)")

    @model_validator(mode="after")
    def _ab_needs_store(self) -> Settings:
        if self.ab_rate > 0 and not self.feedback_db:
            raise ValueError("ab_rate > 0 needs feedback_db: A/B votes are written to the feedback store")
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from RLHF_SERVE_* variables; keyword overrides that are not None win."""
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            env = os.environ.get(ENV_PREFIX + name.upper())
            if env is not None:
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            where = f"serve setting {field} ({ENV_PREFIX}{field.upper()})" if field else "serve settings"
            raise ConfigError(f"{where}: {err['msg']}") from None

"""Settings of the model server (RLHF_SERVE_<FIELD>) and of the A/B feedback gateway (RLHF_GATEWAY_<FIELD>), read
from the environment, overridable in code.

`rlhf serve` and `rlhf gateway` pass their options as overrides; `uvicorn rlhf.serve.main:app` reads only the
environment.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlhf.config.env import EnvSettings


class ABSettings(EnvSettings):
    """What the model server and the gateway share: where A/B pairs and votes go, and how often."""

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

    @model_validator(mode="after")
    def _ab_needs_store(self) -> ABSettings:
        if self.ab_rate > 0 and not self.feedback_db:
            raise ValueError(
                "ab_rate > 0 needs feedback_db (--feedback-db): A/B votes go to the feedback store"
            )
        return self


class Settings(ABSettings):
    """The model server's (`rlhf serve`): every field can be set by an environment variable named
    RLHF_SERVE_<FIELD> (upper case)."""

    env_prefix: ClassVar[str] = "RLHF_SERVE_"
    label: ClassVar[str] = "serve"

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
    seed: int = Field(0, description="Seed of the server's own randomness (unseeded sampling, A/B draws)")


class GatewaySettings(ABSettings):
    """The A/B feedback gateway's (`rlhf gateway`): every field can be set by an environment variable named
    RLHF_GATEWAY_<FIELD> (upper case)."""

    env_prefix: ClassVar[str] = "RLHF_GATEWAY_"
    label: ClassVar[str] = "gateway"

    upstream: str = Field("http://127.0.0.1:8000/v1", description="The engine's OpenAI API base URL (…/v1)")
    candidate_model: str | None = Field(
        None, description="Model id of the candidate side of A/B pairs; unset: the requested model twice"
    )
    candidate_upstream: str | None = Field(
        None, description="Base URL of the engine serving the candidate (default: the upstream)"
    )
    upstream_api_key: str | None = Field(
        None, description="Bearer key sent upstream; unset: the client's Authorization header passes through"
    )
    host: str = Field("127.0.0.1", description="Interface to listen on")
    port: int = Field(8080, ge=0, le=65535, description="TCP port")
    timeout_s: float = Field(600.0, gt=0, description="Longest wait for an upstream answer (or stream chunk)")
    max_connections: int = Field(512, ge=1, description="Most pooled connections to each upstream")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted (413 beyond)")
    seed: int | None = Field(None, description="Seed of the A/B draws (unset: random)")

    @field_validator("upstream", "candidate_upstream")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        """An upstream without its scheme would start the gateway and fail every request (502)."""
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL (e.g. http://{value})")
        return value

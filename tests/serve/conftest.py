"""Fixtures: a tiny untrained Llama (and a second one as the A/B candidate) built in a temp dir, and the
model server running them in a background thread on a free port, with an SQLite feedback store."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import uvicorn
from fastapi import FastAPI

from rlhf.config import ArchConfig
from rlhf.data.demo_task import make_response, render_prompt, sample_question
from rlhf.models.loading import build_causal_lm
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.serve.deps import ServeState
from rlhf.serve.main import create_app
from rlhf.serve.settings import Settings

TINY = ArchConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
CONTEXT = TINY.max_position_embeddings
VOTES_PER_MINUTE = 3


def _dialogues(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = sample_question(rng)
        out.append(f"{render_prompt(q.text)} {make_response(q, rng)}")
    return out


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"policy": dir, "candidate": dir}: one tokenizer, two differently initialised tiny Llamas."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_bpe_tokenizer(_dialogues(300), vocab_size=320)
    dirs = {}
    for name, seed in (("policy", 0), ("candidate", 1)):
        path = root / name
        build_causal_lm(TINY, tokenizer, seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


@contextmanager
def run_server(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    """Serve the app from a background thread on a free port; yield (base URL, app)."""
    with run_app(create_app(settings)) as served:
        yield served


@contextmanager
def run_app(app: FastAPI) -> Iterator[tuple[str, FastAPI]]:
    """Serve any app (the model server, the gateway) from a background thread on a free port."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the model server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The policy served as "tiny", the candidate as "tiny-candidate"; every opted-in request gets A/B."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('store')}/feedback.db"
    settings = Settings(
        model_dir=str(model_dirs["policy"]),
        model_name="tiny",
        candidate_model=str(model_dirs["candidate"]),
        candidate_name="tiny-candidate",
        feedback_db=db_url,
        ab_rate=1.0,
        feedback_per_minute=VOTES_PER_MINUTE,
        max_batch_size=16,
        batch_wait_ms=20,
        max_n=4,
        max_body_bytes=64 * 1024,
    )
    with run_server(settings) as (url, app):
        state: ServeState = app.state.serve
        yield {"url": url, "db_url": db_url, "state": state, "votes_per_minute": VOTES_PER_MINUTE}


@pytest.fixture(scope="session")
def client(server: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)

"""`rlhf serve` (the policy behind an OpenAI-compatible API) and `rlhf gateway` (A/B feedback in front of any
engine)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from rlhf.cli.common import app, setup_logging
from rlhf.feedback.cli import check_port_free


@app.command()
def serve(
    model_dir: Annotated[str, typer.Argument(help="policy to serve: model dir, LoRA adapter dir or hub id")],
    feedback_db: Annotated[
        str | None,
        typer.Option(help="feedback store URL (sqlite:///FILE or postgresql://...) that records A/B votes"),
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    max_batch_size: Annotated[int | None, typer.Option(help="most sequences decoded together")] = None,
    batch_wait_ms: Annotated[
        float | None, typer.Option(help="when idle, how long a request waits for others to batch with")
    ] = None,
    ab_rate: Annotated[
        float | None, typer.Option(help="share of opted-in requests answered with an A/B pair (0..1)")
    ] = None,
    candidate_model: Annotated[
        str | None, typer.Option(help="second policy: A/B pairs compare it with MODEL_DIR")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="model id clients ask for")] = None,
    candidate_name: Annotated[
        str | None, typer.Option(help="model id of --candidate-model (default: from its directory)")
    ] = None,
    max_n: Annotated[int | None, typer.Option(help="most choices per request")] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (default 1; 0 = torch's default)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="log level of the server")] = "info",
) -> None:
    """Serve a policy with an OpenAI-compatible API (chat, completions, streaming), batching and A/B feedback.

    Other settings come from RLHF_SERVE_* variables (see docs/serving.md).
    """
    import uvicorn

    from rlhf.serve.main import create_app, open_state
    from rlhf.serve.settings import Settings

    settings = Settings.from_env(
        model_dir=model_dir, feedback_db=feedback_db, host=host, port=port, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, ab_rate=ab_rate, candidate_model=candidate_model, model_name=model_name,
        candidate_name=candidate_name, max_n=max_n, threads=threads,
    )  # fmt: skip
    setup_logging(quiet=True)
    check_port_free(settings.host, settings.port)  # before the models load, which may take minutes
    state = open_state(settings)  # load the models first: a bad path is one line on stderr, not a traceback
    uvicorn.run(create_app(state=state), host=settings.host, port=settings.port, log_level=log_level)


@app.command()
def gateway(
    upstream: Annotated[
        str, typer.Option(help="the engine's OpenAI API base URL, e.g. http://127.0.0.1:8000/v1")
    ],
    feedback_db: Annotated[
        str | None, typer.Option(help="feedback store URL (sqlite:///FILE or postgresql://...) for A/B votes")
    ] = None,
    ab_rate: Annotated[
        float | None, typer.Option(help="share of opted-in requests answered with an A/B pair (0..1)")
    ] = None,
    candidate_model: Annotated[
        str | None, typer.Option(help="model id of the candidate side of A/B pairs (default: the same model)")
    ] = None,
    candidate_upstream: Annotated[
        str | None, typer.Option(help="base URL of the engine serving the candidate (default: --upstream)")
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    workers: Annotated[
        int, typer.Option(min=1, help="gateway processes (A/B draws and limits are per process)")
    ] = 1,
    log_level: Annotated[str, typer.Option(help="log level of the server")] = "info",
) -> None:
    """A/B feedback in front of any OpenAI-compatible engine (vLLM, TGI, SGLang, Ollama, llama.cpp, rlhf serve).

    Other settings come from RLHF_GATEWAY_* variables (see docs/scaling.md).
    """
    import uvicorn

    from rlhf.serve.gateway import GatewaySettings, create_app

    settings = GatewaySettings.from_env(
        upstream=upstream, feedback_db=feedback_db, ab_rate=ab_rate, candidate_model=candidate_model,
        candidate_upstream=candidate_upstream, host=host, port=port,
    )  # fmt: skip
    setup_logging(quiet=True)
    check_port_free(host, port)
    if settings.feedback_db:  # one that cannot be opened: one line here, not the app's start-up traceback
        from rlhf.feedback.db import open_database

        open_database(settings.feedback_db).dispose()
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
        return
    for name, value in settings.model_dump(exclude_none=True).items():  # each worker reads the environment
        os.environ[GatewaySettings.env_prefix + name.upper()] = str(value)
    uvicorn.run(
        "rlhf.serve.gateway:app", host=host, port=port, workers=workers, log_level=log_level, access_log=False
    )

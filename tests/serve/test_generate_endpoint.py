"""`rlhf generate` with `generate.endpoint`: candidates sampled by `rlhf serve` on a tiny model (and by a fake
engine for the failures), in the candidates format of local sampling, with the engine's policy version."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rlhf.config import GenerateConfig
from rlhf.data.prompts import read_prompt_rows
from rlhf.errors import RlhfError
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tokens import encode_prompts
from rlhf.serve.settings import Settings
from rlhf.stages import generate
from tests.serve.conftest import run_app, run_server

PROMPTS = [
    {"prompt_id": "greet", "messages": [{"role": "user", "content": "Hello!"}]},
    {"prompt_id": "sum", "messages": [{"role": "user", "content": "What is 3 plus 4?"}]},
    {"prompt_id": "thanks", "prompt": "User: Thank you!\nAssistant:"},
]


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return path


def config(model_dirs: dict[str, Path], prompts_file: Path, out: Path, **kwargs: Any) -> GenerateConfig:
    base = {"model": str(model_dirs["policy"]), "prompts_file": str(prompts_file), "out": str(out),
            "max_new_tokens": 8, "endpoint_retries": 0}  # fmt: skip
    return GenerateConfig(**(base | kwargs))


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_candidates_from_rlhf_serve_carry_its_version_and_the_endpoint(
    server: dict[str, Any], model_dirs: dict[str, Path], prompts_file: Path, tmp_path: Path
) -> None:
    url = server["url"] + "/v1"
    out = tmp_path / "candidates.jsonl"
    cfg = config(model_dirs, prompts_file, out, endpoint=url, endpoint_model="tiny", k=3, top_k=20, short_k=1,
                 other_k=1, seed=5)  # fmt: skip
    result = generate.run(cfg)
    version = server["state"].policies["tiny"].version  # name@digest, as /v1/models lists it
    assert version.startswith("tiny@") and result["policy"] == version and result["endpoint"] == url
    rows = read_rows(out)
    assert [r["prompt_id"] for r in rows] == ["greet", "sum", "thanks"]
    sampling = {
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 20,
        "max_new_tokens": 8,
        "seed": 5,
        "endpoint": url,
    }
    for row in rows:
        own = [c for c in row["completions"] if set(c["sampling"]) == set(sampling)]
        assert len(own) == 3 and all(c["sampling"] == sampling and c["policy"] == version for c in own)
        assert all(c["finish_reason"] in ("stop", "length") for c in own)
        assert any(c["finish_reason"] == "length" for c in own)  # an untrained model rarely ends in 8 tokens
        assert all(c["policy"] == version for c in row["completions"])  # short and other answers too
    assert any(c["sampling"].get("truncated") for r in rows for c in r["completions"])
    assert any(c["sampling"].get("answer_to") for r in rows for c in r["completions"])
    # the seed per prompt makes a rerun ask the same, and rlhf serve honours it
    again = tmp_path / "again.jsonl"
    generate.run(cfg.model_copy(update={"out": str(again)}))
    assert read_rows(again) == rows


@pytest.fixture(scope="module")
def varied_model(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The tiny policy with its weights redrawn wide, so that greedy answers differ from prompt to prompt (the
    untrained one answers every prompt with the same token), served as "varied"."""
    path = tmp_path_factory.mktemp("varied") / "varied"
    model = load_causal_lm(str(model_dirs["policy"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(path)
    load_tokenizer(str(model_dirs["policy"])).save_pretrained(path)
    with run_server(Settings(model_dir=str(path), model_name="varied", max_n=4)) as (url, _):
        yield {"dirs": {"policy": path}, "url": url}


def test_greedy_answers_from_rlhf_serve_are_the_local_decoders(
    varied_model: dict[str, Any], prompts_file: Path, tmp_path: Path
) -> None:
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    dirs = varied_model["dirs"]
    # locally the three prompts are decoded in one padded batch, in fp32 as the server runs (auto precision
    # may pick bf16 on this CPU); the engine gets one request each
    generate.run(config(dirs, prompts_file, local, k=1, temperature=0.0, max_new_tokens=16, precision="fp32"))
    generate.run(config(dirs, prompts_file, remote, k=1, temperature=0.0, max_new_tokens=16,
                        endpoint=varied_model["url"] + "/v1", endpoint_model="varied"))  # fmt: skip
    answers = [[(c["text"], c["finish_reason"]) for c in r["completions"]] for r in read_rows(local)]
    assert [[(c["text"], c["finish_reason"]) for c in r["completions"]] for r in read_rows(remote)] == answers
    assert len({text for row in answers for text, _ in row}) == len(PROMPTS)  # a different answer to each


@pytest.fixture
def fake_engine() -> Iterator[dict[str, Any]]:
    """An engine that fails its first `fail` completion requests with 500, then answers `reply` (default: two
    choices); it lists its model without a version, and records each completion request's body."""
    app = FastAPI()
    state: dict[str, Any] = {"fail": 0, "bodies": [], "reply": None}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "big", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        state["bodies"].append(body)
        state["queries"] = [*state.get("queries", []), dict(request.query_params)]
        if state["fail"] > 0:
            state["fail"] -= 1
            return JSONResponse({"error": "overloaded"}, status_code=500, headers={"Retry-After": "0"})
        choices = [{"index": i, "text": f" answer {i} to {body['prompt'][-6:]}", "finish_reason": reason}
                   for i, reason in zip((1, 0), ("length", "stop"), strict=True)]  # fmt: skip
        return JSONResponse(state["reply"] or {"object": "text_completion", "system_fingerprint": "fp_1",
                                               "choices": choices})  # fmt: skip

    with run_app(app) as (url, _):
        state["url"] = url
        yield state


def test_a_failing_engine_is_retried_and_its_answers_kept_in_order(
    fake_engine: dict[str, Any], model_dirs: dict[str, Path], prompts_file: Path, tmp_path: Path
) -> None:
    fake_engine["fail"] = 2
    out = tmp_path / "candidates.jsonl"
    secret_url = fake_engine["url"].replace("http://", "http://user:secret@") + "/v1/"
    cfg = config(model_dirs, prompts_file, out, endpoint=secret_url, endpoint_model="big", k=2, max_prompts=1,
                 endpoint_retries=2, top_p=0.9, seed=3)  # fmt: skip
    generate.run(cfg)
    bodies = fake_engine["bodies"]
    assert len(bodies) == 3 and all(b == bodies[0] for b in bodies)  # two 500s, then the answer
    assert bodies[0]["model"] == "big" and bodies[0]["n"] == 2 and bodies[0]["max_tokens"] == 8
    assert bodies[0]["top_p"] == 0.9 and "top_k" not in bodies[0]  # top_k 0: not sent
    assert bodies[0]["seed"] == generate.request_seed(3, 0) != generate.request_seed(3, 1)
    # the rendered chat as the local tokenizer's ids (BOS once), or as its text with endpoint_prompt: text
    tokenizer = load_tokenizer(str(model_dirs["policy"]))
    (rendered,) = [p for _, p in read_prompt_rows(str(prompts_file), 1, tokenizer)]
    assert bodies[0]["prompt"] == encode_prompts(tokenizer, [rendered])[0]
    generate.run(cfg.model_copy(update={"endpoint_prompt": "text"}))
    assert fake_engine["bodies"][-1]["prompt"] == rendered
    (row,) = read_rows(out)
    completions = row["completions"]
    assert [c["text"][:9] for c in completions] == [" answer 0", " answer 1"]  # by the choices' index
    assert [c["finish_reason"] for c in completions] == ["stop", "length"]
    assert all(c["policy"] == "big@fp_1" for c in completions)  # listed without a version
    assert completions[0]["sampling"]["endpoint"] == fake_engine["url"] + "/v1"  # no credentials


def test_a_reply_that_is_not_a_completion_is_one_line_and_writes_nothing(
    fake_engine: dict[str, Any], model_dirs: dict[str, Path], prompts_file: Path, tmp_path: Path
) -> None:
    fake_engine["reply"] = {"object": "text_completion", "choices": [{"index": 0, "text": " one"}]}
    out = tmp_path / "candidates.jsonl"
    with pytest.raises(RlhfError) as error:
        generate.run(config(model_dirs, prompts_file, out, endpoint=fake_engine["url"] + "/v1", k=2))
    assert "not a completion of 2 choices" in str(error.value) and fake_engine["url"] in str(error.value)
    assert "\n" not in str(error.value) and not out.exists()


def test_an_unknown_model_and_an_unreachable_endpoint_are_one_line_errors(
    server: dict[str, Any], model_dirs: dict[str, Path], prompts_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "candidates.jsonl"
    url = server["url"] + "/v1"
    with pytest.raises(RlhfError) as error:
        generate.run(config(model_dirs, prompts_file, out, endpoint=url, endpoint_model="no-such-model"))
    message = str(error.value)
    assert f"generate.endpoint {url} answered 404" in message and "no-such-model" in message
    assert "\n" not in message and not out.exists()

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(RlhfError) as error:
        generate.run(config(model_dirs, prompts_file, out, endpoint=closed, endpoint_model="tiny"))
    assert str(error.value).startswith(f"generate.endpoint {closed}: ConnectError")
    assert "\n" not in str(error.value) and not out.exists()


def test_a_query_in_the_endpoint_goes_with_every_request(
    fake_engine: dict[str, Any], model_dirs: dict[str, Path], prompts_file: Path, tmp_path: Path
) -> None:
    """`--endpoint http://host/v1?api-version=...` asked /v1?api-version=.../completions: a 404 whose message,
    naming the endpoint without its query, hid why."""
    out = tmp_path / "candidates.jsonl"
    cfg = config(model_dirs, prompts_file, out, endpoint=fake_engine["url"] + "/v1?api-version=2024-06-01",
                 endpoint_model="big", k=2, max_prompts=1)  # fmt: skip
    generate.run(cfg)
    assert fake_engine["queries"] == [{"api-version": "2024-06-01"}]
    assert read_rows(out)[0]["completions"][0]["sampling"]["endpoint"] == fake_engine["url"] + "/v1"

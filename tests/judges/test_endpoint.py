"""The OpenAI-compatible endpoint judge against a fake server (httpx.MockTransport): retries on 5xx and 429
with Retry-After honoured, logprobs read or the answer parsed, and a disk cache that makes a re-run free."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from rlhf.engine.decoding import SamplingParams
from rlhf.errors import RlhfError
from rlhf.judges import endpoint
from rlhf.judges.base import Answer
from rlhf.judges.endpoint import EndpointJudge
from rlhf.text_models import EndpointModel

PROMPT = "Write a haiku about tea."


def reply(content: str, top: dict[str, float] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content}}
    if top is not None:
        choice["logprobs"] = {"content": [{"token": content, "logprob": 0.0,
                                           "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}]}  # fmt: skip
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


class FakeEndpoint:
    """Answers 500, then 429 with Retry-After: 3, then chat completions that favour the response holding
    "green" with P = 0.8 (from top logprobs); records every request."""

    def __init__(self, failures: list[httpx.Response] | None = None, logprobs: bool = True) -> None:
        self.failures = failures if failures is not None else [
            httpx.Response(500, text="boom"), httpx.Response(429, headers={"Retry-After": "3"}, text="slow down")
        ]  # fmt: skip
        self.logprobs = logprobs
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        if self.failures:
            return self.failures.pop(0)
        if body.get("logprobs") and not self.logprobs:
            return httpx.Response(
                400, json={"error": {"message": "'logprobs' is not supported", "param": "logprobs"}}
            )
        text = body["messages"][0]["content"]
        green_first = "green" in text.split("[Response B]")[0]
        p_a = 0.8 if green_first else 0.2
        if body.get("logprobs"):
            return httpx.Response(
                200, json=reply("A", {"A": math.log(p_a), " B": math.log(1 - p_a), "C": -9.0})
            )
        return httpx.Response(200, json=reply("A" if green_first else "Response B is better."))


def make(
    tmp_path: Path, fake: FakeEndpoint, sleeps: list[float] | None = None, **kwargs: Any
) -> EndpointJudge:
    return EndpointJudge("http://judge.test/v1", "judge-model", api_key="secret", cache_path=str(tmp_path / "cache.sqlite"),
                         transport=httpx.MockTransport(fake), sleep=(sleeps.append if sleeps is not None else lambda s: None),
                         **({"requests_per_s": 1000.0, "backoff_s": 0.5} | kwargs))  # fmt: skip


def test_retries_then_reads_logprobs_then_a_rerun_sends_nothing(tmp_path: Path) -> None:
    fake, sleeps = FakeEndpoint(), []
    judge = make(tmp_path, fake, sleeps)
    pairs = [
        (PROMPT, Answer("green tea steams"), Answer("black coffee")),
        (PROMPT, Answer("milk"), Answer("green leaf")),
    ]
    p = judge.compare_all(pairs)
    # both orders, each 0.8 for the green answer: the debiased preference is 0.8
    assert p == pytest.approx([0.8, 0.2], abs=1e-6)
    stats = judge.stats()
    assert stats["requests"] == 6 and stats["retries"] == 2 and stats["read_logprobs"] == 4
    assert sleeps[0] == 0.5 and 3.0 in sleeps  # backoff after the 500, Retry-After after the 429
    assert fake.requests[-1]["temperature"] == 0 and fake.requests[-1]["model"] == "judge-model"
    assert stats["position_bias_first"] == pytest.approx(0.5, abs=1e-6)
    judge.close()

    offline = FakeEndpoint(failures=[httpx.Response(500)] * 100)
    again = make(tmp_path, offline)
    assert again.compare_all(pairs) == pytest.approx(p, abs=1e-9)
    assert offline.requests == [] and again.stats()["cache_hits"] == 4
    again.close()


def test_an_endpoint_without_logprobs_is_read_from_the_answer_text(tmp_path: Path) -> None:
    fake = FakeEndpoint(failures=[], logprobs=False)
    judge = make(tmp_path, fake)
    assert judge.compare(PROMPT, Answer("green"), Answer("red")) == 1.0
    assert judge.compare(PROMPT, Answer("red"), Answer("green")) == 0.0
    assert judge.logprobs is False and judge.stats()["read_text"] == 4
    assert sum(1 for r in fake.requests if r.get("logprobs")) == 1  # asked once, then never again


def test_the_last_error_is_one_line_after_the_retries(tmp_path: Path) -> None:
    judge = make(tmp_path, FakeEndpoint(failures=[httpx.Response(503, text="down")] * 10), retries=2)
    with pytest.raises(RlhfError, match="judge endpoint http://judge.test/v1/ answered 503"):
        judge.compare(PROMPT, Answer("a"), Answer("b"))
    assert judge.stats()["requests"] == 3
    # a model answering (a red-team target, a CAI policy) through the same client is not called a judge
    model = EndpointModel("http://target.test/v1", "m", transport=httpx.MockTransport(
        lambda request: httpx.Response(503, text="down")), retries=0, sleep=lambda s: None)  # fmt: skip
    with pytest.raises(RlhfError, match="^model endpoint http://target.test/v1/ answered 503"):
        model.complete_all(["hi"], SamplingParams(max_new_tokens=4))


def test_requests_are_paced_to_the_rate_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]  # a clock that moves only when the judge sleeps: requests themselves take no time
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(endpoint.time, "monotonic", lambda: now[0])
    judge = make(tmp_path, FakeEndpoint(failures=[]), requests_per_s=20.0)
    judge.sleep = sleep
    judge.compare(PROMPT, Answer("green"), Answer("red"))
    judge.compare(PROMPT, Answer("blue"), Answer("green"))
    assert sleeps == pytest.approx([0.05] * 3)  # 1 / 20 s before each request but the first


def test_concurrent_requests_give_the_same_verdicts(tmp_path: Path) -> None:
    pairs = [(f"{PROMPT} {i}", Answer("green" if i % 3 else "red"), Answer("grey")) for i in range(8)]
    one = make(tmp_path / "one", FakeEndpoint(failures=[])).compare_all(pairs)
    judge = make(tmp_path / "four", FakeEndpoint(failures=[]), concurrency=4)
    assert judge.compare_all(pairs) == one == [0.5 if i % 3 == 0 else 0.8 for i in range(8)]
    assert judge.stats()["requests"] == 16 and judge.stats()["read_logprobs"] == 16


def test_the_template_keeps_braces_in_answers() -> None:
    from rlhf.judges.base import render

    text = render("{principle}|{prompt}|{first}|{second}", "Say {x}", " {second} ", "b", None)
    assert text == "Which response is more helpful, honest and harmless?|Say {x}|{second}|b"


def test_concurrent_requests_refused_logprobs_all_fall_back_to_the_answer_text(tmp_path: Path) -> None:
    fake = FakeEndpoint(failures=[], logprobs=False)
    # the first 4 requests all ask for logprobs before any of them is refused
    in_flight = threading.Barrier(4, timeout=10)

    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("logprobs"):
            in_flight.wait()
        return fake(request)

    judge = EndpointJudge("http://judge.test/v1", "judge-model", cache_path=str(tmp_path / "cache.sqlite"),
                          transport=httpx.MockTransport(answer), sleep=lambda s: None, requests_per_s=1000.0,
                          concurrency=4)  # fmt: skip
    pairs = [(f"{PROMPT} {i}", Answer("green"), Answer("grey")) for i in range(4)]
    assert judge.compare_all(pairs) == [1.0] * 4
    assert judge.logprobs is False and judge.stats()["read_text"] == 8
    assert sum(1 for r in fake.requests if r.get("logprobs")) == 4


def test_a_reply_that_is_not_a_chat_completion_is_one_line(tmp_path: Path) -> None:
    """A 200 whose body was HTML ended in a JSONDecodeError traceback; one without choices was read as a tie."""
    for body, content_type in ((b"<html>oops</html>", "text/html"), (b'{"choices": []}', "application/json")):
        judge = make(tmp_path, lambda r, b=body, c=content_type: httpx.Response(200, content=b, headers={"content-type": c}))  # type: ignore[misc]  # fmt: skip
        with pytest.raises(
            RlhfError, match=r"^judge endpoint http://judge.test/v1/?: not a chat completion: "
        ):
            judge.compare(PROMPT, Answer("green"), Answer("red"))
        judge.close()


def test_a_reply_naming_neither_choice_is_warned_of_and_not_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken judge's ties were cached, so a later run against a working one read them back without asking."""
    judge = make(tmp_path, lambda r: httpx.Response(200, json=reply("I cannot decide.")), both_orders=False)
    with caplog.at_level("WARNING"):
        assert judge.compare(PROMPT, Answer("green"), Answer("red")) == 0.5
    assert "1 of 1 replies named neither A nor B" in caplog.text
    judge.close()
    fake = FakeEndpoint(failures=[])
    working = make(tmp_path, fake, both_orders=False)
    assert working.compare(PROMPT, Answer("green"), Answer("red")) == pytest.approx(0.8)
    assert len(fake.requests) == 1 and "cache_hits" not in working.stats()
    working.close()


def test_the_cache_tells_two_endpoints_with_a_model_of_one_name_apart(tmp_path: Path) -> None:
    fake = FakeEndpoint(failures=[])
    judge = make(tmp_path, fake, both_orders=False)
    assert judge.compare(PROMPT, Answer("green"), Answer("red")) == pytest.approx(0.8)
    judge.close()
    other = FakeEndpoint(failures=[])
    elsewhere = EndpointJudge("http://other.test/v1", "judge-model", cache_path=str(tmp_path / "cache.sqlite"),
                              transport=httpx.MockTransport(other), sleep=lambda s: None, both_orders=False)  # fmt: skip
    elsewhere.compare(PROMPT, Answer("green"), Answer("red"))
    assert len(other.requests) == 1
    elsewhere.close()

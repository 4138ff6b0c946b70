"""The official `openai` client against the running server: chat, streaming, n, seeds, stop, completions."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest
import torch

from rlhf.data.demo_task import render_prompt
from rlhf.models.tokens import encode_prompts, encode_responses

HELLO = [{"role": "user", "content": "Hello!"}]


def test_chat_completion_counts_tokens_and_renders_the_demo_dialogue_format(
    client: openai.OpenAI, server: dict[str, Any]
) -> None:
    out = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert out.object == "chat.completion" and out.model == "tiny"
    assert len(out.choices) == 1 and out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    tokenizer = server["state"].main.tokenizer
    # the chat template gives exactly the demo task's prompt text, so the policy sees what it was trained on
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(tokenizer(render_prompt("Hello!"))["input_ids"])
    steps = out.usage.completion_tokens
    assert 1 <= steps <= 6 and out.usage.total_tokens == out.usage.prompt_tokens + steps
    assert out.choices[0].finish_reason == ("length" if steps == 6 else "stop")
    assert getattr(out, "feedback_id", None) is None  # not opted in to A/B


def test_stream_assembles_to_the_same_text_as_the_plain_answer(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "tiny", "messages": HELLO, "max_tokens": 12, "temperature": 0}
    plain = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage is not None and plain.usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_ends_with_done(server: dict[str, Any]) -> None:
    body = {"model": "tiny", "prompt": "User: hi\nAssistant:", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_n_choices_and_seeded_reproducibility(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "tiny", "messages": HELLO, "max_tokens": 10, "temperature": 1.0}
    first = client.chat.completions.create(n=2, seed=1234, **kwargs)
    again = client.chat.completions.create(n=2, seed=1234, **kwargs)
    other = client.chat.completions.create(n=2, seed=99, **kwargs)
    assert [c.index for c in first.choices] == [0, 1]

    def texts(out: Any) -> list[str]:
        return [c.message.content for c in out.choices]

    assert texts(first) == texts(again)
    assert texts(first) != texts(other)
    assert texts(first)[0] != texts(first)[1]  # the choices of one request are different samples


def test_stop_string_cuts_the_text(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": "tiny",
        "prompt": "User: What is 2 plus 2?\nAssistant:",
        "temperature": 0,
    }
    full = client.completions.create(max_tokens=16, **kwargs).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    cut = client.completions.create(max_tokens=16, stop=[stop, "\x00never"], **kwargs).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(max_tokens=16, stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


def test_completions_with_a_list_of_prompts(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="tiny", prompt=["User: hi\nAssistant:", "User: yo"], n=2, max_tokens=3
    )
    assert out.object == "text_completion"
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and all(c.finish_reason for c in out.choices)


def test_completions_take_prompts_as_token_ids(client: openai.OpenAI, server: dict[str, Any]) -> None:
    """As OpenAI and vLLM take them: a prompt's token ids, or a list of those, continued as they are."""
    text = "User: hi\nAssistant:"
    ids = encode_prompts(server["state"].main.tokenizer, [text])[0]
    kwargs: dict[str, Any] = {"model": "tiny", "max_tokens": 4, "temperature": 0}
    by_text = client.completions.create(prompt=text, **kwargs)
    by_ids = client.completions.create(prompt=ids, **kwargs)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    both = client.completions.create(prompt=[ids, ids[:3]], **kwargs)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == by_text.choices[0].text
    assert both.usage is not None and both.usage.prompt_tokens == len(ids) + 3


def test_chat_stop_strings_are_not_looked_for_in_the_dropped_leading_space(
    client: openai.OpenAI, server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chat answer is shown without its leading whitespace; a stop string met only there (a newline right
    after "Assistant:") must not end an answer the user sees nothing of. Completions keep every character."""
    engine = server["state"].main.engine
    script = encode_responses(engine.tokenizer, [" \nHi there\nUser: more"])[0]

    def scripted(logits: torch.Tensor, seqs: list[Any]) -> torch.Tensor:  # the tokens of `script`, in order
        return torch.tensor([script[min(len(s.tokens), len(script) - 1)] for s in seqs])

    monkeypatch.setattr(engine, "_sample", scripted)
    kwargs: dict[str, Any] = {"model": "tiny", "max_tokens": len(script), "stop": ["\n"]}
    chat = client.chat.completions.create(messages=HELLO, **kwargs).choices[0]  # type: ignore[arg-type]
    assert (chat.message.content, chat.finish_reason) == ("Hi there", "stop")
    chunks = client.chat.completions.create(messages=HELLO, stream=True, **kwargs)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi there"
    text = client.completions.create(prompt="User: hi\nAssistant:", **kwargs).choices[0]
    assert (text.text, text.finish_reason) == (" ", "stop")


def test_models_list_the_policy_and_candidate_with_versions(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "tiny-candidate"}
    versions = {m.model_extra["version"] for m in models.values()}  # type: ignore[index]
    assert all(v.startswith(("tiny@", "tiny-candidate@")) for v in versions) and len(versions) == 2
    assert client.models.retrieve("tiny").id == "tiny"


def test_bad_request_raises_the_openai_error(client: openai.OpenAI, server: dict[str, Any]) -> None:
    context = server["state"].main.context_length
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=context + 1)  # type: ignore[arg-type]
    assert e.value.status_code == 400
    assert f"maximum context length is {context} tokens" in e.value.message
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=HELLO)  # type: ignore[arg-type]


def test_metrics_count_requests_and_tokens(client: openai.OpenAI, server: dict[str, Any]) -> None:
    client.completions.create(model="tiny", prompt="User: hi", max_tokens=3)
    text = httpx.get(server["url"] + "/metrics").text
    assert 'rlhf_serve_requests_total{endpoint="/v1/completions",status="200"}' in text
    generated = [
        line
        for line in text.splitlines()
        if line.startswith('rlhf_serve_generated_tokens_total{model="tiny"}')
    ]
    assert generated and float(generated[0].split()[-1]) >= 3
    for name in (
        "rlhf_serve_batch_size_bucket",
        "rlhf_serve_request_seconds_bucket",
        "rlhf_serve_tokens_per_second",
    ):
        assert name in text
    health = httpx.get(server["url"] + "/healthz").json()
    assert health["status"] == "ok" and set(health["models"]) == {"tiny", "tiny-candidate"}


def generated(server: dict[str, Any]) -> float:
    for line in httpx.get(server["url"] + "/metrics").text.splitlines():
        if line.startswith('rlhf_serve_generated_tokens_total{model="tiny"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_goes_away_frees_its_row(server: dict[str, Any]) -> None:
    body = {"model": "tiny", "prompt": "User: hi", "max_tokens": 120, "temperature": 0}
    full = httpx.post(server["url"] + "/v1/completions", json=body, timeout=60).json()["usage"]
    assert full["completion_tokens"] > 40  # greedy: the stream below would make as many
    before = generated(server)
    with httpx.stream(
        "POST", server["url"] + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 4:
                break  # leave after a couple of tokens
    time.sleep(1.0)
    assert generated(server) - before < full["completion_tokens"] / 2


def test_a_client_that_times_out_before_a_whole_answer_frees_its_rows(server: dict[str, Any]) -> None:
    """Not only streams: a non-streaming request whose client gives up (a timeout) stops generating."""
    body = {"model": "tiny", "prompt": "User: hi", "max_tokens": 120, "temperature": 0, "n": 4}
    full = httpx.post(server["url"] + "/v1/completions", json=body, timeout=60).json()["usage"]
    assert full["completion_tokens"] > 4 * 40
    before = generated(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server["url"] + "/v1/completions", json=body, timeout=0.02)
    time.sleep(1.5)
    assert generated(server) - before < full["completion_tokens"] / 2

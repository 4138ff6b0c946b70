"""Log-probabilities through the OpenAI API: each reported token's log-prob is the model's own log_softmax for
its prefix, recomputed here offline; the shapes of chat, completions and streams; n choices; stop strings."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tokens import encode_prompts

HELLO = [{"role": "user", "content": "Hello!"}]
ATOL = 1e-4


@pytest.fixture(scope="module")
def offline(model_dirs: dict[str, Path]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The served policy, loaded again to recompute log-probs outside the server."""
    path = str(model_dirs["policy"])
    return load_causal_lm(path).eval(), load_tokenizer(path)


def log_softmax(model: PreTrainedModel, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(V,) the log-probs of the token after `ids`: the whole prefix through the model, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()  # (V,)
    return torch.log_softmax(logits / temperature, dim=-1)


def walk(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: list[int],
    tokens: list[str],
    logprobs: list[float],
) -> list[tuple[torch.Tensor, int]]:
    """Follow reported (token text, log-prob) pairs from `prompt`: at each step the id whose text it is and
    whose offline log-prob it is (to ATOL; several ids may read U+FFFD). Returns (log-probs, id) per step."""
    ids, steps = list(prompt), []
    texts = [tok.decode([i]) for i in range(len(tok))]
    for text, reported in zip(tokens, logprobs, strict=True):
        logp = log_softmax(model, ids)
        matches = [i for i, t in enumerate(texts) if t == text and abs(logp[i] - reported) < ATOL]
        assert matches, f"no token reads {text!r} at log-prob {reported} after {len(ids)} tokens"
        steps.append((logp, matches[0]))
        ids.append(matches[0])
    return steps


def chat_prompt_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    return encode_prompts(tok, [tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)])[
        0
    ]


def test_chat_logprobs_are_the_models_log_softmax_and_top_logprobs_are_its_top(
    client: openai.OpenAI, offline: tuple[PreTrainedModel, PreTrainedTokenizerBase]
) -> None:
    model, tok = offline
    out = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=5,  # type: ignore[arg-type]
    )
    choice = out.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert out.usage is not None
    # every generated token but an ending EOS / end-of-turn
    assert len(content) == out.usage.completion_tokens - (choice.finish_reason == "stop")
    assert "".join(e.token for e in content).lstrip() == choice.message.content
    ids = chat_prompt_ids(tok)
    for entry in content:
        logp = log_softmax(model, ids)
        pad = tok.pad_token_id
        greedy = int(logp.masked_fill(torch.arange(logp.numel()) == pad, float("-inf")).argmax())
        assert entry.token == tok.decode([greedy])
        assert entry.logprob == pytest.approx(float(logp[greedy]), abs=ATOL)
        assert entry.bytes == list(entry.token.encode())
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True)
        assert top == pytest.approx(logp.topk(5).values.tolist(), abs=ATOL)
        if entry.logprob > top[-1] + ATOL:  # among the top: listed with its own log-prob
            assert (entry.token, entry.logprob) in [(t.token, t.logprob) for t in entry.top_logprobs]
        ids.append(greedy)


def test_completion_logprobs_of_sampled_tokens_are_the_raw_distributions(
    client: openai.OpenAI, offline: tuple[PreTrainedModel, PreTrainedTokenizerBase]
) -> None:
    """Sampled at temperature 0.7 within top_p 0.8, n = 2: each token's log-prob is that of the token emitted,
    under the model's raw distribution (temperature 1, before top-p), as vLLM reports by default."""
    model, tok = offline
    prompt = tok("User: Is the sky green?")["input_ids"]
    out = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=8, temperature=0.7, top_p=0.8, seed=5, n=2, logprobs=3
    )
    assert len(out.choices) == 2 and out.choices[0].text != out.choices[1].text
    tempered_differs = False
    for choice in out.choices:
        lp = choice.logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert "".join(lp.tokens) == choice.text
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        steps = walk(model, tok, prompt, lp.tokens, lp.token_logprobs)  # type: ignore[arg-type]
        ids = list(prompt)
        for (logp, token), top, sampled, text in zip(
            steps, lp.top_logprobs, lp.token_logprobs, lp.tokens, strict=True
        ):
            assert top[text] == sampled  # the sampled token is always there (up to logprobs + 1 entries)
            listed = {*logp.topk(3).indices.tolist(), token}  # ids; several may read the same (U+FFFD)
            assert set(top) == {tok.decode([i]) for i in listed}
            for shown, value in top.items():
                assert any(tok.decode([i]) == shown and abs(logp[i] - value) < ATOL for i in listed)
            tempered = float(log_softmax(model, ids, temperature=0.7)[token])
            tempered_differs |= abs(tempered - sampled) > 1e-2
            ids.append(token)
    assert tempered_differs  # the reported numbers are not those of the sampling distribution


def test_streams_carry_the_logprobs_of_their_chunks(client: openai.OpenAI) -> None:
    common: dict[str, Any] = {"model": "tiny", "max_tokens": 10, "temperature": 1.0, "seed": 11}
    whole = client.completions.create(prompt="User: hi", logprobs=2, **common)
    chunks = list(client.completions.create(prompt="User: hi", logprobs=2, stream=True, **common))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(parts) >= 2  # spread over the stream, not all at the end
    assert whole.choices[0].logprobs is not None
    assert [t for p in parts for t in p.tokens or []] == whole.choices[0].logprobs.tokens
    assert [o for p in parts for o in p.text_offset or []] == whole.choices[0].logprobs.text_offset
    streamed = [x for p in parts for x in p.token_logprobs or []]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=ATOL)

    chat = client.chat.completions.create(messages=HELLO, logprobs=True, top_logprobs=1, **common)  # type: ignore[arg-type]
    stream = list(
        client.chat.completions.create(messages=HELLO, logprobs=True, top_logprobs=1, stream=True, **common)
    )  # type: ignore[arg-type]
    entries = [
        e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    assert [e.token for e in entries] == [e.token for e in chat.choices[0].logprobs.content]
    assert all(len(e.top_logprobs) == 1 for e in entries)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content == "".join(e.token for e in entries).lstrip()


def test_tokens_of_a_stop_string_and_after_it_are_not_reported(client: openai.OpenAI) -> None:
    """A seeded answer, then the same request with a stop string that first occurs as one of its tokens: the
    text and the tokens reported both end before that token, streamed or not."""
    prompt = "User: What is 2 plus 3?"
    common: dict[str, Any] = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 3,
    }
    full = client.completions.create(logprobs=0, **common).choices[0]
    assert full.logprobs is not None and full.logprobs.tokens and full.logprobs.text_offset
    tokens, offsets = full.logprobs.tokens, full.logprobs.text_offset
    cut_at = next(
        k
        for k in range(2, len(tokens))
        if tokens[k].strip() and "\ufffd" not in tokens[k] and full.text.find(tokens[k]) == offsets[k]
    )
    stop, offset = tokens[cut_at], offsets[cut_at]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(logprobs=0, stop=stop, stream=True, **common))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            tokens = [
                t
                for c in chunks
                if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.tokens or []
            ]
        else:
            cut = client.completions.create(logprobs=0, stop=stop, **common).choices[0]
            assert cut.finish_reason == "stop" and cut.logprobs is not None
            text, tokens = cut.text, cut.logprobs.tokens or []
        assert text == full.text[:offset]
        assert tokens == full.logprobs.tokens[:cut_at]


def test_rows_with_and_without_logprobs_share_batches_and_sample_alike(server: dict[str, Any]) -> None:
    """Concurrent seeded requests, half asking for logprobs: each gets the text it gets alone without them,
    and only those that asked get logprobs."""
    url = server["url"] + "/v1/completions"
    bodies = [
        {
            "model": "tiny",
            "prompt": f"User: question {i}",
            "max_tokens": 12,
            "temperature": 1.0,
            "seed": 40 + i,
        }
        | ({"logprobs": i % 3} if i % 2 else {})
        for i in range(8)
    ]
    alone = [
        httpx.post(url, json={k: v for k, v in b.items() if k != "logprobs"}, timeout=60).json()
        for b in bodies
    ]
    engine = server["state"].main.engine
    before = sum(engine.batch_sizes.values())
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: http.post(url, json=b).json(), bodies))
    assert sum(engine.batch_sizes.values()) > before
    for body, a, t in zip(bodies, alone, together, strict=True):
        assert t["choices"][0]["text"] == a["choices"][0]["text"]
        logprobs = t["choices"][0]["logprobs"]
        if "logprobs" in body:
            assert logprobs is not None and "".join(logprobs["tokens"]) == t["choices"][0]["text"]
            assert all(len(top) <= body["logprobs"] + 1 for top in logprobs["top_logprobs"])
        else:
            assert logprobs is None


def test_plain_answers_say_logprobs_null(server: dict[str, Any]) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 3, "logprobs": False, "top_logprobs": 0}
    r = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
    assert json.loads(r.text)["choices"][0]["message"]["content"] is not None

"""The endpoint judge against this project's own server (`rlhf serve` on a tiny model): the server gives
logprobs, so the judge reads its preference from the top log-probabilities of the answer's first token, the
same number recomputed offline; a second run is served from the cache."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf.judges.base import Answer, render
from rlhf.judges.endpoint import EndpointJudge
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tokens import encode_prompts

PROMPT = "Hello!"
TEMPLATE = "{prompt} A:{first} B:{second} Better:"  # the tiny model's context is 128 tokens
TOP = 5  # the top_logprobs the judge asks for


def first_token_top(model_dir: Path, texts: list[str]) -> list[dict[str, float]]:
    """Per judging prompt, offline: the judge's `TOP` likeliest first answer tokens, as the judge reads them
    (text stripped) -> their summed probability."""
    model, tok = load_causal_lm(str(model_dir)).eval(), load_tokenizer(str(model_dir))
    tops = []
    for text in texts:
        chat = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        with torch.no_grad():
            logits = model(torch.tensor(encode_prompts(tok, [chat]))).logits[0, -1]  # (V,)
        top = torch.log_softmax(logits.float(), dim=-1).topk(TOP)
        probs: dict[str, float] = {}
        for i, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            key = tok.decode([i]).strip()
            probs[key] = probs.get(key, 0.0) + math.exp(lp)
        tops.append(probs)
    return tops


def test_the_endpoint_judge_reads_logprobs_from_rlhf_serve(
    server: dict[str, Any], model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache.sqlite")
    pairs = [
        (PROMPT, Answer(" Hello! How can I help?"), Answer(" Go away.")),
        (PROMPT, Answer(" Hi."), Answer(" Hey.")),
    ]
    texts = [render(TEMPLATE, p, a.text, b.text, None) for p, a, b in pairs]
    texts += [render(TEMPLATE, p, b.text, a.text, None) for p, a, b in pairs]
    tops = first_token_top(model_dirs["policy"], texts)
    # An untrained model names neither A nor B: the judge's two choices are tokens it does rank first
    choices = tuple([t for t in tops[0] if t][:2])
    assert len(choices) == 2 and all(any(c in top for c in choices) for top in tops)
    expected = [
        top.get(choices[0], 0.0) / (top.get(choices[0], 0.0) + top.get(choices[1], 0.0)) for top in tops
    ]

    judge = EndpointJudge(server["url"] + "/v1", "tiny", cache_path=cache, requests_per_s=100.0, max_tokens=3,
                          template=TEMPLATE, choices=choices)  # type: ignore[arg-type]  # fmt: skip
    assert [judge.ask(t) for t in texts] == pytest.approx(expected, abs=1e-3)
    judge.close()
    stats = judge.stats()
    assert stats["logprobs_supported"] is True and stats["read_logprobs"] == 4  # no fallback to the text
    assert stats["requests"] == 4 and "retries" not in stats

    again = EndpointJudge(server["url"] + "/v1", "tiny", cache_path=cache, requests_per_s=100.0, max_tokens=3,
                          template=TEMPLATE, choices=choices)  # type: ignore[arg-type]  # fmt: skip
    debiased = again.compare_all(pairs)
    assert again.stats().get("requests", 0) == 0 and again.stats()["cache_hits"] == 4
    assert all(0.0 <= p <= 1.0 for p in debiased)
    again.close()

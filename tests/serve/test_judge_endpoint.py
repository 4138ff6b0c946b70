"""The endpoint judge against this project's own server (`rlhf serve` on a tiny model): the server refuses
logprobs, so the judge falls back to reading the answer text; a second run is served from the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.judges.base import Answer
from rlhf.judges.endpoint import EndpointJudge

PROMPT = "Hello!"
TEMPLATE = "{prompt} A:{first} B:{second} Better:"  # the tiny model's context is 128 tokens


def test_the_endpoint_judge_talks_to_rlhf_serve(server: dict[str, Any], tmp_path: Path) -> None:
    cache = str(tmp_path / "cache.sqlite")
    pairs = [
        (PROMPT, Answer(" Hello! How can I help?"), Answer(" Go away.")),
        (PROMPT, Answer(" Hi."), Answer(" Hey.")),
    ]
    judge = EndpointJudge(server["url"] + "/v1", "tiny", cache_path=cache, requests_per_s=100.0, max_tokens=3,
                         template=TEMPLATE)  # fmt: skip
    first = judge.compare_all(pairs)
    stats = judge.stats()
    judge.close()
    assert (
        stats["logprobs_supported"] is False
    )  # refused with a 400 naming the field; asked without from then on
    assert stats["requests"] == 4 + 1 and stats["questions_asked"] == 4
    assert (
        stats.get("read_text", 0) + stats.get("read_unparsed", 0) == 4
    )  # an untrained model rarely answers A or B
    assert all(0.0 <= p <= 1.0 for p in first)

    again = EndpointJudge(server["url"] + "/v1", "tiny", cache_path=cache, requests_per_s=100.0, max_tokens=3,
                         template=TEMPLATE)  # fmt: skip
    assert again.compare_all(pairs) == first
    assert again.stats().get("requests", 0) == 0 and again.stats()["cache_hits"] == 4
    again.close()

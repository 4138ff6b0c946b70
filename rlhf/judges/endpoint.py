"""An OpenAI-compatible chat endpoint as a pairwise judge (vLLM, Ollama, llama.cpp's server, a hosted API, or
`rlhf serve`).

Each judging prompt is sent once to `/chat/completions` at temperature 0. Where the endpoint returns
log-probabilities, the preference is read from the top log-probabilities of the first answer token
(P(A) / (P(A) + P(B))); otherwise from the first choice letter in the answer (1 or 0), and an answer that
names neither counts as a tie (reported as `read_unparsed`). An endpoint that refuses `logprobs` (a 400 naming
it) is asked without them from then on. Pairs are asked in both orders (see `PositionBias`).

Up to `concurrency` requests are in flight at once, paced to `requests_per_s`, retried with exponential backoff on connection errors, 429 and 5xx
(a Retry-After header is honoured), and cached on disk by (model, judging prompt): a re-run sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from rlhf.errors import RlhfError
from rlhf.judges.base import DEFAULT_TEMPLATE, JudgeBase, Pair, PositionBias, check_template, render
from rlhf.retry import send_retrying

log = logging.getLogger(__name__)


class ResponseCache:
    """(judge, judging prompt) -> the judge's reading, in an SQLite file; a judge is its endpoint and model
    (`EndpointJudge.cache_id`), so another server with a model of the same name is asked again."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.lock = threading.Lock()
        self.db.execute("CREATE TABLE IF NOT EXISTS judge_cache (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    @staticmethod
    def key(model: str, text: str) -> str:
        return hashlib.sha256(json.dumps([model, text]).encode()).hexdigest()

    def get(self, model: str, text: str) -> dict[str, Any] | None:
        with self.lock:
            query = "SELECT value FROM judge_cache WHERE key = ?"
            row = self.db.execute(query, (self.key(model, text),)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def put(self, model: str, text: str, value: dict[str, Any]) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO judge_cache VALUES (?, ?)",
                            (self.key(model, text), json.dumps(value)))  # fmt: skip

    def close(self) -> None:
        self.db.close()


class EndpointJudge(JudgeBase):
    name = "endpoint"
    role = "judge endpoint"  # what its errors call it

    def __init__(
        self, url: str, model: str, api_key: str | None = None, template: str = DEFAULT_TEMPLATE,
        choices: tuple[str, str] = ("A", "B"), both_orders: bool = True, requests_per_s: float = 5.0,
        timeout_s: float = 60.0, retries: int = 5, backoff_s: float = 1.0, max_tokens: int = 4,
        cache_path: str | None = None, concurrency: int = 1, transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:  # fmt: skip
        check_template(template)
        self.model, self.template, self.choices, self.both_orders = model, template, choices, both_orders
        self.min_interval = 1.0 / requests_per_s if requests_per_s > 0 else 0.0
        self.retries, self.backoff_s, self.max_tokens, self.sleep = retries, backoff_s, max_tokens, sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.cache_id = f"{self.http.base_url} {model}"
        self.logprobs = True  # until the endpoint refuses them
        self.counts: Counter[str] = Counter()
        self.position = PositionBias()
        self.concurrency = max(1, concurrency)
        self._next_slot = -math.inf
        self._failure: str | None = None
        self._lock = threading.Lock()  # pacing, counters and the cache are shared by the worker threads
        self._pattern = re.compile(r"\b(" + "|".join(re.escape(c) for c in choices) + r")\b")

    def close(self) -> None:
        self.http.close()
        if self.cache is not None:
            self.cache.close()

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        """POST to /chat/completions, paced and retried (`rlhf.retry`); the last error is raised as one line."""

        def paced() -> httpx.Response:
            with self._lock:  # book the next free slot of the rate limit, then wait for it outside the lock
                now = time.monotonic()
                wait = self._next_slot - now
                self._next_slot = max(now, self._next_slot) + self.min_interval
                self.counts["requests"] += 1
            if wait > 0:
                self.sleep(wait)
            return self.http.post("/chat/completions", json=body)

        try:
            return send_retrying(paced, retries=self.retries, backoff_s=self.backoff_s, sleep=self.sleep,
                                 on_retry=lambda reason, wait: self._count("retries"))  # fmt: skip
        except httpx.TransportError as e:
            raise RlhfError(f"{self.role} {self.http.base_url}: {type(e).__name__}: {e}") from None

    def ask(self, text: str) -> float:
        """P(the first slot wins) for one judging prompt, from the cache or the endpoint; after one request
        has failed for good, the others fail at once instead of retrying a broken endpoint."""
        if self._failure is not None:
            raise RlhfError(self._failure)
        try:
            return self._ask(text)
        except RlhfError as e:
            self._failure = str(e)
            raise

    def _ask(self, text: str) -> float:
        if self.cache is not None and (hit := self.cache.get(self.cache_id, text)) is not None:
            self._count("cache_hits", "read_" + hit["how"])
            return float(hit["p_first"])
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": text}],
                                "max_tokens": self.max_tokens, "temperature": 0}  # fmt: skip
        asked_logprobs = self.logprobs
        if asked_logprobs:
            body |= {"logprobs": True, "top_logprobs": 5}
        response = self._post(body)
        # read what this request asked, not the flag: a concurrent request may have turned it off meanwhile
        if response.status_code == 400 and asked_logprobs and "logprobs" in response.text:
            if self.logprobs:
                log.info("%s refuses logprobs: reading the answer text instead", self.role)
            self.logprobs = False
            return self._ask(text)
        if response.status_code >= 400:
            raise RlhfError(
                f"{self.role} {self.http.base_url} answered {response.status_code}: {response.text[:200]}"
            )
        try:
            reply = response.json()
            message = reply["choices"][0]["message"]
        except (ValueError, LookupError, TypeError):  # not JSON, or JSON of another shape
            raise RlhfError(
                f"{self.role} {self.http.base_url}: not a chat completion: {response.text[:200]}"
            ) from None
        if not isinstance(message, dict):
            raise RlhfError(f"{self.role} {self.http.base_url}: not a chat completion: {response.text[:200]}")
        p_first, how = self.read(reply)
        self._count("read_" + how)
        if self.cache is not None and how != "unparsed":  # a reply naming neither choice is asked again
            self.cache.put(self.cache_id, text, {"p_first": p_first, "how": how})
        return p_first

    def read(self, reply: dict[str, Any]) -> tuple[float, str]:
        """(P(first slot), how it was read: "logprobs", "text" or "unparsed") from a chat completion."""
        choice = (reply.get("choices") or [{}])[0]
        tokens = ((choice.get("logprobs") or {}).get("content")) or []
        if tokens:
            probs = [0.0, 0.0]
            for top in tokens[0].get("top_logprobs") or []:
                token = str(top.get("token", "")).strip()
                if token in self.choices:
                    probs[self.choices.index(token)] += math.exp(float(top["logprob"]))
            if sum(probs) > 0:
                return probs[0] / sum(probs), "logprobs"
        content = str((choice.get("message") or {}).get("content") or "")
        if m := self._pattern.search(content):
            return (1.0 if m.group(1) == self.choices[0] else 0.0), "text"
        return 0.5, "unparsed"

    def _count(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self.counts[key] += 1

    def compare_all(self, pairs: Sequence[Pair], principle: str | None = None) -> list[float]:
        texts = [render(self.template, p, a.text, b.text, principle) for p, a, b in pairs]
        if self.both_orders:
            texts += [render(self.template, p, b.text, a.text, principle) for p, a, b in pairs]
        unparsed = self.counts["read_unparsed"]
        with ThreadPoolExecutor(self.concurrency) as pool:  # requests in flight at once; still paced
            p_first = list(pool.map(self.ask, texts))
        if (missed := self.counts["read_unparsed"] - unparsed) > 0:
            log.warning("%s %s: %d of %d replies named neither %s nor %s: each read as a tie (0.5)",
                        self.role, self.http.base_url, missed, len(texts), *self.choices)  # fmt: skip
        if not self.both_orders:
            return [self.position.one_order(x) for x in p_first]
        n = len(pairs)
        return [self.position.debias(x, y) for x, y in zip(p_first[:n], p_first[n:], strict=True)]

    def stats(self) -> dict[str, Any]:
        return (
            self.position.stats()
            | {"model": self.model, "logprobs_supported": self.logprobs}
            | dict(self.counts)
        )

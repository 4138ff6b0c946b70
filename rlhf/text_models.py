"""A model that answers text, as red teaming and Constitutional AI use one: a local checkpoint (sampled with
rlhf.engine.decoding) or any OpenAI-compatible chat endpoint (the judge's client: paced, retried).

`reply_all` answers user messages as an assistant (the checkpoint's chat template, or the default one where it
has none: rlhf.models.tokens); `complete_all` continues raw text (a local checkpoint) or sends it as one user message (an
endpoint), for critique and revision prompts written out in full.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlhf.engine.decoding import SamplingParams, decode_responses, generate
from rlhf.errors import RlhfError
from rlhf.judges.endpoint import EndpointJudge
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tokens import chat_prompt, encode_prompts, stop_ids


@dataclass
class Reply:
    text: str
    ended: bool  # stopped by itself (EOS, or finish_reason "stop"), not cut at max tokens


class TextModel(Protocol):
    name: str

    def reply_all(self, messages: Sequence[str], params: SamplingParams) -> list[Reply]: ...

    def complete_all(self, texts: Sequence[str], params: SamplingParams) -> list[Reply]: ...

    def prompt_of(self, message: str) -> str:
        """The text the model is given for a user message (what preference data and SFT data record)."""
        ...

    def reseed(self, seed: int) -> None:
        """Sample from here on as a fresh model seeded with `seed` would."""
        ...


class LocalModel:
    """A causal LM checkpoint, sampled in batches; one seeded generator, so a run repeats exactly."""

    def __init__(self, path: str, batch_size: int = 16, seed: int = 0):
        self.name = path
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(
            path
        )  # with a PAD of its own where it had none: the model grows to fit
        self.model = load_causal_lm(path, tokenizer=self.tokenizer).eval().to(self.device)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def prompt_of(self, message: str) -> str:
        """The message as the checkpoint's chat template shows it (the default one where it has none)."""
        return chat_prompt(self.tokenizer, [{"role": "user", "content": message}])

    def reply_all(self, messages: Sequence[str], params: SamplingParams) -> list[Reply]:
        return self.complete_all([self.prompt_of(m) for m in messages], params)

    @torch.no_grad()
    def complete_all(self, texts: Sequence[str], params: SamplingParams) -> list[Reply]:
        out: list[Reply] = []
        stops, pad = stop_ids(self.tokenizer), self.tokenizer.pad_token_id
        for i in range(0, len(texts), self.batch_size):
            ids = encode_prompts(self.tokenizer, texts[i : i + self.batch_size])  # BOS once, where it has one
            gen = generate(
                self.model, ids, params, stops, pad if pad is not None else stops[0], self.generator
            )
            texts_ = decode_responses(self.tokenizer, gen)
            out += [Reply(t, bool(e)) for t, e in zip(texts_, gen.ended.tolist(), strict=True)]
        return out


class EndpointModel(EndpointJudge):
    """An OpenAI-compatible chat endpoint, through the judge's paced and retried client."""

    role = "model endpoint"

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", seed: int = 0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(url, model, api_key=os.environ.get(api_key_env), **kwargs)
        self.name, self.seed, self.calls = f"{url.rstrip('/')}#{model}", seed, 0

    def prompt_of(self, message: str) -> str:
        return message

    def reseed(self, seed: int) -> None:
        self.seed, self.calls = seed, 0

    def _reply(self, item: tuple[int, str, SamplingParams]) -> Reply:
        seed, message, params = item
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": message}],
                                "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                                "top_p": params.top_p, "seed": seed}  # fmt: skip
        response = self._post(body)
        if response.status_code >= 400:
            raise RlhfError(
                f"{self.role} {self.http.base_url} answered {response.status_code}: {response.text[:200]}"
            )
        try:
            choice = response.json()["choices"][0]
            return Reply(str(choice["message"].get("content") or ""), choice.get("finish_reason") == "stop")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RlhfError(
                f"{self.role} {self.http.base_url}: not a chat completion: {response.text[:200]}"
            ) from None

    def reply_all(self, messages: Sequence[str], params: SamplingParams) -> list[Reply]:
        # each request its own seed, from the run's seed and the request's place in the run: a re-run repeats
        items = [(self.seed * 1_000_003 + self.calls + i, m, params) for i, m in enumerate(messages)]
        self.calls += len(messages)
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._reply, items))

    def complete_all(self, texts: Sequence[str], params: SamplingParams) -> list[Reply]:
        return self.reply_all(texts, params)


def load_text_model(model: str, url: str | None = None, *, batch_size: int = 16, seed: int = 0,
                    api_key_env: str = "OPENAI_API_KEY",
                    requests_per_s: float = 5.0, concurrency: int = 4, timeout_s: float = 60.0,
                    retries: int = 5) -> TextModel:  # fmt: skip
    """A checkpoint (`model` a directory or hub id) or, given `url`, the endpoint's model named `model`."""
    if url:
        return EndpointModel(url, model, api_key_env, seed=seed, requests_per_s=requests_per_s,
                             concurrency=concurrency, timeout_s=timeout_s, retries=retries)  # fmt: skip
    return LocalModel(model, batch_size=batch_size, seed=seed)

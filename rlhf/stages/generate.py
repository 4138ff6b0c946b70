"""`rlhf generate`: K candidate answers per prompt from a policy, the comparison tasks labelers judge.

Writes the candidates JSONL that the labeling app imports, one row per prompt:
  {"prompt", "prompt_id", "completions": [{"text", "policy", "sampling": {...}, "finish_reason"}]}
Each completion carries its lineage: the policy version and the sampling parameters that made it.
finish_reason is "stop" when the policy ended with EOS, "length" when it ran out of max_new_tokens.

With `short_k`, each prompt also gets the policy's own answers cut short: the first sentence of sampled answer
j < short_k ("Sure!", "Good question.", "Yes."), or the empty answer where that sentence is already a
candidate. A policy optimised against the reward model finds such answers when it learns to stop early; a
reward model that never saw them cannot know they are bad (Gao et al. 2022 on overoptimisation), so labelers
judge them beside the full answers. Their sampling record says `"truncated": "first_sentence"`.

With `other_k`, each prompt also gets that many answers the policy gave to other prompts, drawn at random
with the seed: fluent, well-formed and off the question ("I don't know." to an arithmetic question, "You are
welcome!" to a request, the sum of other numbers). A policy optimised against the reward model drifts towards
such answers when the reward model scores them by their form alone; labels on them teach it that an answer
must fit its own question. Their sampling record says `"answer_to": <the other prompt's id>`.

With `extra_models`, each prompt also gets `extra_k` answers from each of those policies (an earlier or a
weaker checkpoint, such as the pretrained model), named by their own policy version: labels on answers of
several policies show the reward model mistakes one policy never makes and another optimised against it may
find (non-answers, answers of the wrong type, invented facts); Llama 2 sampled its comparison pairs from
different model variants for the same reason (Touvron et al. 2023, sec. 3.2.1).

With `endpoint`, an OpenAI-compatible engine (vLLM, TGI, SGLang, `rlhf serve`) samples the main policy's
answers instead: `model` only loads the tokenizer that renders each prompt as it does locally (chat template
included), and the rendered text goes to POST {endpoint}/completions with n = k and the sampling settings, with
a seed per prompt derived from `seed` and the prompt's place, so a rerun asks the same where the engine honours
seeds. The policy version is the one the engine lists under /models (`rlhf serve` lists name@digest), else
model@system_fingerprint, else the served model's name; the sampling record names the endpoint. short_k and
other_k work on those answers as on local ones; extra_models still sample locally.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import httpx
import torch

from rlhf.config import GenerateConfig
from rlhf.data.jsonl import check_output_file, write_jsonl
from rlhf.data.prompts import read_prompt_rows
from rlhf.engine.decoding import SamplingParams, decode_responses, generate
from rlhf.errors import RlhfError
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tokens import encode_prompts, stop_ids
from rlhf.retry import send_retrying
from rlhf.train.common import resolve_precision

log = logging.getLogger(__name__)


def policy_name(model: str, policy_version: str | None) -> str:
    """The policy version stored with each completion: the given name, else the checkpoint's directory name
    (its parent's too when that is a generic 'final', e.g. runs/sft/final -> 'sft/final')."""
    if policy_version:
        return policy_version
    path = Path(model)
    return f"{path.parent.name}/{path.name}" if path.name == "final" and path.parent.name else path.name


def first_sentence(text: str) -> str:
    """The answer up to its first sentence end, leading space kept: " Sure! 3 plus 4 is 7." -> " Sure!"."""
    match = re.search(r"[.!?](?=\s|$)", text)
    return text[: match.end()] if match else text


def short_answers(completions: list[dict[str, Any]], short_k: int) -> list[dict[str, Any]]:
    """Up to short_k extra candidates: the first sentence of answer j, or the empty answer where that sentence
    is already a candidate; none that would repeat a candidate."""
    seen = {c["text"] for c in completions}
    extra = []
    for c in completions[:short_k]:
        text = first_sentence(c["text"])
        if text in seen:
            text = ""
        if text in seen:
            continue
        seen.add(text)
        extra.append({"text": text, "policy": c["policy"], "sampling": {**c["sampling"], "truncated": "first_sentence"},
                      "finish_reason": "stop"})  # fmt: skip
    return extra


def other_answers(
    n: int,
    prompts: list[tuple[str, str]],
    texts: list[str],
    ended: list[bool],
    cfg: GenerateConfig,
    policies: list[str],
    sampling: dict[str, Any],
    rng: random.Random,
) -> list[dict[str, Any]]:
    """Up to cfg.other_k extra candidates for prompt n: answers sampled for other prompts (each a random answer
    of a random other prompt), none that would repeat one of prompt n's own answers or each other; policies[m]
    is the version that answered prompt m."""
    if cfg.other_k == 0 or len(prompts) < 2:
        return []
    own = {texts[j] for j in range(n * cfg.k, (n + 1) * cfg.k)}
    extra: list[dict[str, Any]] = []
    for _ in range(cfg.other_k):
        m = rng.randrange(len(prompts) - 1)
        m += m >= n  # any prompt but n
        j = m * cfg.k + rng.randrange(cfg.k)
        if texts[j] in own:
            continue
        own.add(texts[j])
        extra.append({"text": texts[j], "policy": policies[m], "sampling": {**sampling, "answer_to": prompts[m][0]},
                      "finish_reason": "stop" if ended[j] else "length"})  # fmt: skip
    return extra


def sample_answers(
    cfg: GenerateConfig, model: str, tokenizer: Any, prompts: list[str], k: int, seed: int
) -> tuple[list[str], list[bool]]:
    """k sampled answers to every prompt by `model`, in batches; item i is answer i % k of prompt i // k."""
    policy = load_causal_lm(model, tokenizer=tokenizer)
    policy.eval()
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, seed)
    generator = torch.Generator().manual_seed(seed)
    bf16 = resolve_precision(cfg.precision) == "bf16" and not torch.cuda.is_available()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    flat = [ids for ids in encode_prompts(tokenizer, prompts) for _ in range(k)]
    texts: list[str] = []
    ended: list[bool] = []
    for i in range(0, len(flat), cfg.batch_size):
        with autocast:
            gen = generate(
                policy, flat[i : i + cfg.batch_size], params, stop_ids(tokenizer),
                tokenizer.pad_token_id, generator=generator,
            )  # fmt: skip
        texts.extend(decode_responses(tokenizer, gen))
        ended.extend(bool(e) for e in gen.ended.tolist())
        log.info("generate: %d / %d answers of %s", len(texts), len(flat), model)
    return texts, ended


def credential_free(url: str) -> str:
    """The endpoint as records and errors name it: without a user, password, query or fragment (a key may hide
    in any of them), and without a trailing slash."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def excerpt(text: str) -> str:
    """The start of an engine's reply on one line (an HTML error page has many)."""
    return " ".join(text[:200].split())


def request_seed(seed: int, n: int) -> int:
    """The seed of prompt n's request: fixed by the run's seed and the prompt's place, unrelated between
    neighbouring seeds (seed + n would give prompt 1 of seed 0 the answers of prompt 0 of seed 1); 31 bits,
    which every engine takes."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{n}".encode()).digest()[:4], "big") >> 1


def send(http: httpx.Client, method: str, path: str, body: dict[str, Any] | None, cfg: GenerateConfig,
         url: str) -> httpx.Response:  # fmt: skip
    """The engine's response, retried on connection errors, timeouts, 429 and 5xx (`rlhf.retry`); the last
    connection error is raised as one line naming the endpoint."""

    def warn(reason: str, wait: float) -> None:
        log.warning("generate.endpoint %s: %s; retrying in %.0fs", url, reason, wait)

    try:
        return send_retrying(lambda: http.request(method, path, json=body), retries=cfg.endpoint_retries,
                             backoff_s=1.0, on_retry=warn)  # fmt: skip
    except httpx.TransportError as e:
        raise RlhfError(f"generate.endpoint {url}: {type(e).__name__}: {excerpt(str(e))}") from None


def listed_version(http: httpx.Client, cfg: GenerateConfig, url: str, model: str) -> str | None:
    """The version the engine lists for `model` under /models, or None: listed without one, not listed (TGI
    answers under any name), or no usable listing (the completions then tell whether the endpoint works)."""
    response = send(http, "GET", "/models", None, cfg, url)
    if response.status_code in (401, 403):
        raise RlhfError(f"generate.endpoint {url} refused the key in ${cfg.endpoint_api_key_env} "
                        f"({response.status_code}): {excerpt(response.text)}")  # fmt: skip
    try:
        listed = {m["id"]: m.get("version") for m in response.json()["data"]}
    except (ValueError, LookupError, TypeError, AttributeError):
        log.warning("generate.endpoint %s: no model list (%d); versions come from the answers", url,
                    response.status_code)  # fmt: skip
        return None
    version = listed.get(model)
    return str(version) if version else None


def read_completion(response: httpx.Response, k: int, url: str) -> tuple[list[str], list[bool], str | None]:
    """(texts, ended, system_fingerprint) of a text completion with k choices; anything else is one line."""
    if response.status_code >= 400:
        raise RlhfError(f"generate.endpoint {url} answered {response.status_code}: {excerpt(response.text)}")
    try:
        reply = response.json()
        choices = sorted(reply["choices"], key=lambda c: int(c.get("index", 0)))
        texts = [c["text"] for c in choices]
        reasons = [c.get("finish_reason") for c in choices]
        if len(texts) != k or not all(isinstance(t, str) for t in texts):
            raise TypeError
    except (ValueError, LookupError, TypeError, AttributeError):  # not JSON, or JSON of another shape
        raise RlhfError(
            f"generate.endpoint {url}: not a completion of {k} choices: {excerpt(response.text)}"
        ) from None
    fingerprint = reply.get("system_fingerprint")
    # "length" is the one reason an answer was cut; engines name an ended one "stop" (TGI also "eos_token")
    return texts, [r != "length" for r in reasons], str(fingerprint) if fingerprint else None


def endpoint_answers(
    cfg: GenerateConfig, prompts: list[str] | list[list[int]]
) -> tuple[list[str], list[bool], list[str]]:
    """cfg.k answers to every prompt (its text, or its token ids: `endpoint_prompt`) from cfg.endpoint, laid out
    as `sample_answers` lays them out, and the policy version of each prompt's answers. Up to
    endpoint_concurrency prompts are asked at once."""
    assert cfg.endpoint is not None
    url, model = credential_free(cfg.endpoint), cfg.endpoint_model or cfg.model
    key = os.environ.get(cfg.endpoint_api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict[str, Any] = {"model": model, "n": cfg.k, "temperature": cfg.temperature, "top_p": cfg.top_p,
                            "max_tokens": cfg.max_new_tokens}  # fmt: skip
    if cfg.top_k:
        body["top_k"] = cfg.top_k  # not OpenAI's; vLLM, SGLang and rlhf serve take it
    limits = httpx.Limits(max_connections=cfg.endpoint_concurrency)
    # a query in the endpoint (Azure's api-version, a key some gateways take) goes with every request, after its
    # path: in the base URL, the paths would be appended to the query
    parts = urllib.parse.urlsplit(cfg.endpoint)
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    params = httpx.QueryParams(parts.query)
    with httpx.Client(base_url=base, params=params, headers=headers, timeout=cfg.endpoint_timeout_s,
                      limits=limits) as http:  # fmt: skip
        listed = listed_version(http, cfg, url, model)

        def ask(n: int) -> tuple[list[str], list[bool], str]:
            prompt = {"prompt": prompts[n], "seed": request_seed(cfg.seed, n)}
            response = send(http, "POST", "/completions", body | prompt, cfg, url)
            texts, ended, fingerprint = read_completion(response, cfg.k, url)
            return texts, ended, listed or (f"{model}@{fingerprint}" if fingerprint else model)

        replies = []
        with ThreadPoolExecutor(cfg.endpoint_concurrency) as pool:
            futures = [pool.submit(ask, n) for n in range(len(prompts))]
            try:
                for done, future in enumerate(futures, 1):
                    replies.append(future.result())
                    if done % 100 == 0 or done == len(prompts):
                        log.info(
                            "generate: %d / %d prompts answered by %s at %s", done, len(prompts), model, url
                        )
            except BaseException:  # the first failure ends the run: the prompts not yet asked are not asked
                for f in futures:
                    f.cancel()
                raise
    return ([t for r in replies for t in r[0]], [e for r in replies for e in r[1]],
            [cfg.policy_version or r[2] for r in replies])  # fmt: skip


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Sample cfg.k answers to every prompt in batches; write the candidates file; return a summary."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model, cfg.add_pad_token)
    # read before any output: bad input leaves nothing behind
    prompts = read_prompt_rows(cfg.prompts_file, cfg.max_prompts, tokenizer)
    check_output_file(cfg.out, "generate.out")
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    sampling: dict[str, Any] = {
        k: params.as_dict()[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
    }
    if cfg.endpoint:
        sampling["endpoint"] = credential_free(cfg.endpoint)
        texts_in = [p for _, p in prompts]
        # as token ids by default: an engine tokenizing the rendered text again may add a second BOS (vLLM's
        # completions add special tokens) or split the template's special tokens otherwise
        asked = encode_prompts(tokenizer, texts_in) if cfg.endpoint_prompt == "tokens" else texts_in
        texts, ended, policies = endpoint_answers(cfg, asked)
    else:
        texts, ended = sample_answers(cfg, cfg.model, tokenizer, [p for _, p in prompts], cfg.k, cfg.seed)
        policies = [policy_name(cfg.model, cfg.policy_version)] * len(prompts)
    sampling_extra = {k: v for k, v in sampling.items() if k != "endpoint"}
    extra: list[tuple[str, dict[str, Any], list[str], list[bool]]] = []
    for i, model in enumerate(cfg.extra_models):
        extra_tokenizer = load_tokenizer(model, cfg.add_pad_token)
        # each policy samples from a seed of its own, so adding one changes no other policy's answers; its
        # answers record that seed
        seed = cfg.seed + 1 + i
        extra.append((policy_name(model, None), sampling_extra | {"seed": seed}, *sample_answers(cfg, model,
                      extra_tokenizer, [p for _, p in prompts], cfg.extra_k, seed)))  # fmt: skip

    rows: list[dict[str, Any]] = []
    rng = random.Random(cfg.seed)
    for n, (prompt_id, prompt) in enumerate(prompts):
        answers = range(n * cfg.k, (n + 1) * cfg.k)
        completions = [
            {"text": texts[j], "policy": policies[n], "sampling": sampling,
             "finish_reason": "stop" if ended[j] else "length"}
            for j in answers
        ]  # fmt: skip
        completions += short_answers(completions, cfg.short_k)
        completions += other_answers(n, prompts, texts, ended, cfg, policies, sampling, rng)
        seen = {c["text"] for c in completions}
        for name, other_sampling, other_texts, other_ended in extra:
            for j in range(n * cfg.extra_k, (n + 1) * cfg.extra_k):
                if other_texts[j] not in seen:
                    seen.add(other_texts[j])
                    completions.append({"text": other_texts[j], "policy": name, "sampling": other_sampling,
                                        "finish_reason": "stop" if other_ended[j] else "length"})  # fmt: skip
        rows.append({"prompt": prompt, "prompt_id": prompt_id, "completions": completions})
    write_jsonl(cfg.out, rows)
    seconds = time.perf_counter() - start
    return {
        "prompts": len(rows),
        "completions": sum(len(r["completions"]) for r in rows),
        "eos_rate": ended.count(True) / len(ended),
        "distinct_per_prompt": sum(len({c["text"] for c in r["completions"]}) for r in rows) / len(rows),
        "seconds": seconds,
        "policy": Counter(policies).most_common(1)[0][0],
        "endpoint": sampling.get("endpoint"),
        "out": cfg.out,
    }

"""The batching worker: joining a running batch changes no output; seeds hold in any batch and give what
`generate` gives; rows free up; a model whose cache cannot be joined is served in static batches; and
concurrent requests through the server are decoded together."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from rlhf.engine import decode_cache
from rlhf.engine.decode_batch import DecodeBatch
from rlhf.engine.decoding import SamplingParams, decode_responses, generate
from rlhf.engine.sampling import stream_keys
from rlhf.models.loading import context_length, load_causal_lm, load_tokenizer
from rlhf.models.tokens import stop_ids
from rlhf.serve.engine import Engine
from rlhf.serve.sequence import Delta, RowParams, Sequence
from tests.archs import save_tiny

PROMPTS = [
    "User: Hello!\nAssistant:",
    "User: What is 2 plus 3?\nAssistant:",
    "User: hi",
    "User: Is the sky green?",
]


class Collector:
    """Gathers the deltas of several sequences; `wait()` until all have finished."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.deltas: dict[int, list[Delta]] = {i: [] for i in range(n)}
        self.done = threading.Event()
        self._lock = threading.Lock()

    def emit(self, delta: Delta) -> None:
        with self._lock:
            self.deltas[delta.index].append(delta)
            ended = sum(1 for ds in self.deltas.values() if ds and (ds[-1].finish_reason or ds[-1].error))
            if ended == self.n:
                self.done.set()

    def text(self, i: int) -> str:
        return "".join(d.text for d in self.deltas[i])

    def wait(self) -> None:
        assert self.done.wait(60), "sequences did not finish"


@pytest.fixture(scope="module")
def engine(model_dirs: dict[str, Path]) -> Any:
    path = str(model_dirs["policy"])
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    eng = Engine(model, tokenizer, "test", max_batch_size=8, batch_wait_s=0.0)
    eng.start()
    yield eng
    eng.stop()


def test_sequences_joining_a_running_batch_get_the_same_greedy_text(engine: Engine) -> None:
    tok = engine.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    expected = [
        decode_responses(
            tok,
            generate(
                engine.model, [p], SamplingParams(10, temperature=0), tok.eos_token_id, tok.pad_token_id
            ),
        )[0]
        for p in ids
    ]
    got = Collector(len(ids))
    for i, p in enumerate(ids):  # staggered: each joins a batch already decoding, with a different length
        engine.submit([Sequence(p, RowParams(max_tokens=10, temperature=0), i, got.emit, stream=i % 2 == 0)])
        time.sleep(0.02)
    got.wait()
    assert [got.text(i) for i in range(len(ids))] == expected


def test_a_seeded_sequence_samples_the_same_alone_or_in_company(engine: Engine) -> None:
    tok = engine.tokenizer
    seeded = RowParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = Collector(1)
    engine.submit([Sequence(tok(PROMPTS[0])["input_ids"], seeded, 0, alone.emit)])
    alone.wait()
    crowd = Collector(4)
    others = [RowParams(max_tokens=12, temperature=t, top_k=k) for t, k in ((0.0, 0), (1.5, 5), (0.7, 0))]
    seqs = [Sequence(tok(PROMPTS[i + 1])["input_ids"], p, i + 1, crowd.emit) for i, p in enumerate(others)]
    engine.submit([*seqs[:2], Sequence(tok(PROMPTS[0])["input_ids"], seeded, 0, crowd.emit), seqs[2]])
    crowd.wait()
    assert crowd.text(0) == alone.text(0)


def test_a_row_the_model_cannot_take_fails_alone(engine: Engine) -> None:
    tok = engine.tokenizer
    got = Collector(5)
    good = RowParams(max_tokens=6, temperature=0)
    seqs = [
        Sequence(tok(PROMPTS[0])["input_ids"], good, 0, got.emit),
        Sequence([], good, 1, got.emit),  # an empty prompt: no token to start from
        Sequence(tok(PROMPTS[1])["input_ids"], RowParams(max_tokens=6, top_k=2**63), 2, got.emit),
        Sequence([engine.model.config.vocab_size + 5], good, 3, got.emit),
        Sequence(tok(PROMPTS[2])["input_ids"], good, 4, got.emit),
    ]
    engine.submit(seqs)  # admitted together, in one prefill
    got.wait()
    for i in (0, 4):
        assert got.deltas[i][-1].error is None and got.deltas[i][-1].finish_reason in ("stop", "length")
    for i in (1, 2, 3):
        assert got.deltas[i][-1].error is not None
    assert engine.alive


def test_a_cancelled_sequence_stops_growing(engine: Engine) -> None:
    tok = engine.tokenizer
    got = Collector(2)
    long = Sequence(tok(PROMPTS[0])["input_ids"], RowParams(max_tokens=60), 0, got.emit, stream=True)
    short = Sequence(tok(PROMPTS[1])["input_ids"], RowParams(max_tokens=20), 1, got.emit)
    engine.submit([long, short])
    while not long.tokens:
        time.sleep(0.001)
    long.cancelled = True
    deadline = time.monotonic() + 60
    while not (got.deltas[1] and got.deltas[1][-1].finish_reason):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert len(long.tokens) < 60 and not any(d.finish_reason for d in got.deltas[0])


def test_concurrent_requests_are_batched(client: openai.OpenAI, server: dict[str, Any]) -> None:
    engine = server["state"].main.engine
    before = Counter(engine.batch_sizes)

    def ask(i: int) -> str:
        out = client.completions.create(model="tiny", prompt=PROMPTS[i % 4], max_tokens=16, temperature=1.0)
        return out.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(answers) == 8
    steps = Counter(engine.batch_sizes)
    steps.subtract(before)
    assert max(size for size, count in steps.items() if count > 0) >= 4


def test_seeded_sequences_joining_mid_way_sample_what_generate_samples(engine: Engine) -> None:
    """The worker decodes through generate's decoder (a SlotCache, on this CPU): seeded rows, each joining a
    batch already decoding and leaving at its own length, draw the tokens generate draws for them."""
    tok, stops = engine.tokenizer, stop_ids(engine.tokenizer)
    assert engine.decode_step is not None  # the packed, in-place path, not DynamicCache
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    rows = [
        RowParams(max_tokens=8 + 5 * i, temperature=1.0, top_p=0.9, seed=100 + i) for i in range(len(ids))
    ]
    expected = []
    for p, r in zip(ids, rows, strict=True):
        params = SamplingParams(r.max_tokens, temperature=r.temperature, top_p=r.top_p)
        gen = generate(engine.model, [p], params, stops, engine.pad_id, seeds=stream_keys(r.seed)[None])
        expected.append(gen.response_ids[0][gen.response_mask[0].bool()].tolist())
    got = Collector(len(ids))
    seqs = [Sequence(p, r, i, got.emit) for i, (p, r) in enumerate(zip(ids, rows, strict=True))]
    for seq in seqs:
        engine.submit([seq])
        while not seq.tokens:  # the next one joins a running batch
            time.sleep(0.001)
    got.wait()
    assert [seq.tokens for seq in seqs] == expected


def test_a_sliding_window_model_is_served_by_static_batches(tmp_path: Path) -> None:
    """A window shorter than the context: transformers' DynamicCache, whose sliding layers cannot be joined;
    newcomers wait for the running batch, and every row gets generate's greedy answer."""
    path = save_tiny("mistral", tmp_path / "mistral")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    tok = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tokenizer=tok).eval()
    assert not decode_cache.supports(model, context_length(model))
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    greedy = SamplingParams(12, temperature=0)
    expected = [generate(model, [p], greedy, -1, int(tok.pad_token_id)).response_ids[0].tolist() for p in ids]
    engine = Engine(model, tok, "window", batch_wait_s=0.0)
    engine.stop_ids = []  # every row runs to its length, past the window
    engine.start()
    try:
        assert engine.decode_step is None
        got = Collector(len(ids))
        seqs = [Sequence(p, RowParams(max_tokens=12, temperature=0), i, got.emit) for i, p in enumerate(ids)]
        engine.submit(seqs[:2])
        while not seqs[0].tokens:
            time.sleep(0.001)
        engine.submit(seqs[2:])  # while the first two decode
        got.wait()
    finally:
        engine.stop()
    assert [seq.tokens for seq in seqs] == expected
    assert all(got.deltas[i][-1].finish_reason == "length" for i in range(len(ids)))
    assert max(engine.batch_sizes) == 2  # the newcomers were not joined to the running pair


def test_a_row_whose_prefill_fails_fails_alone(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill that fails for the batch: the rows that fail alone get errors, the others are prefilled
    together and answer as they would have."""
    tok = engine.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    poison = next(t for t in ids[1] if t not in ids[0] + ids[2])  # a token only the second prompt has
    greedy = RowParams(max_tokens=6, temperature=0)
    expected = Collector(2)
    engine.submit([Sequence(ids[0], greedy, 0, expected.emit), Sequence(ids[2], greedy, 1, expected.emit)])
    expected.wait()
    prefill = DecodeBatch.prefill

    def failing(batch: DecodeBatch, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if (input_ids == poison).any():
            raise RuntimeError("this prompt breaks the model")
        return prefill(batch, input_ids, mask)

    monkeypatch.setattr(DecodeBatch, "prefill", failing)
    got = Collector(3)
    engine.submit([Sequence(p, greedy, i, got.emit) for i, p in enumerate(ids)])  # admitted together
    got.wait()
    assert "this prompt breaks the model" in str(got.deltas[1][-1].error)
    assert [got.text(0), got.text(2)] == [expected.text(0), expected.text(1)]
    assert got.deltas[0][-1].error is None and got.deltas[2][-1].error is None


def test_rows_that_ask_for_logprobs_get_the_raw_log_softmax_of_their_tokens(engine: Engine) -> None:
    """Sampled rows (temperature 0.8, top-p 0.9) with and without logprobs in one batch, one streamed: each
    asking row reports every token it emitted but an ending EOS, with its log-prob under log_softmax(logits)
    of the whole prefix, recomputed without the cache, and its likeliest alternatives; the others report none."""
    tok = engine.tokenizer
    rows = [
        RowParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=60 + i, logprobs=[None, 0, 3, 2][i])
        for i in range(4)
    ]
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    got = Collector(4)
    seqs = [
        Sequence(p, r, i, got.emit, stream=i == 3) for i, (p, r) in enumerate(zip(ids, rows, strict=True))
    ]
    engine.submit(seqs)
    got.wait()
    assert all(d.logprobs is None for d in got.deltas[0])
    for i in (1, 2, 3):
        reported = [e for d in got.deltas[i] for e in d.logprobs or []]
        tokens = seqs[i].tokens
        assert [e.token for e in reported] == (tokens[:-1] if tokens[-1] in engine.stop_ids else tokens)
        for k, entry in enumerate(reported):
            with torch.no_grad():
                logits = engine.model(torch.tensor([ids[i] + tokens[:k]])).logits[0, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)  # (V,)
            assert entry.logprob == pytest.approx(float(logp[entry.token]), abs=1e-4)
            n = rows[i].logprobs or 0
            assert [lp for _, lp in entry.top] == pytest.approx(logp.topk(n).values.tolist(), abs=1e-4)
            assert all(float(logp[t]) == pytest.approx(lp, abs=1e-4) for t, lp in entry.top)


def test_incremental_text_cuts_and_offsets_match_decoding_the_whole_answer(engine: Engine) -> None:
    """`_update_text` against what decoding every token list whole gives: the text, where each token's text
    begins, and the cut at the first stop string (chat rows skip the leading whitespace)."""
    tok, rng = engine.tokenizer, random.Random(0)
    for trial in range(60):
        ids = [rng.randrange(len(tok)) for _ in range(40)]
        whole = tok.decode(ids, skip_special_tokens=True)
        stop = whole[rng.randrange(len(whole)) :][:3] if whole.strip() and trial % 3 else ""
        params = RowParams(max_tokens=100, stop=(stop,) if stop else (), skip_leading_space=trial % 2 == 0)
        seq, text = Sequence([], params, 0, lambda d: None, stream=True), ""
        for token in ids:
            seq.tokens.append(token)
            new = tok.decode(seq.tokens, skip_special_tokens=True)
            begins = len(os.path.commonprefix([text, new]))
            assert engine._update_text(seq) == begins
            start = len(new) - len(new.lstrip()) if params.skip_leading_space else 0
            cut = new.find(stop, start) if stop else -1
            assert seq.text == (new[:cut] if cut >= 0 else new)
            if cut >= 0:
                assert seq.finish_reason == "stop" and seq.cut
                break
            text = new

"""The generation worker: one thread owns the model and runs every request through one growing batch.

Continuous batching over the decoder `generate` runs on (rlhf.engine.decode_batch.DecodeBatch): on a CPU a
cache written in place with one mask per step and `decode_attention`; elsewhere transformers' `DynamicCache`.
Between decode steps the worker admits waiting sequences: it prefills their prompts as a small batch of their
own, then joins it to the running batch, the narrower of the two left-padded along the cache's slots (each
row keeps its own attention mask and position ids, so padding changes nothing it attends to). Finished rows
leave the batch at once, and leading slots that only padding fills are cut away. When the worker is idle, the
first request waits up to `batch_wait_s` for company before its prefill. Caches whose layers are not plain
`DynamicLayer`s (sliding windows shorter than the context) cannot be joined; then new sequences wait for the
running batch to finish (static batching).

The scheduling stays here: admission, per-row sampling parameters, stop ids and strings, streaming and
cancellation; the log-probs of the rows that ask are kept and reported by rlhf.serve.logprobs.

Requests talk to the worker through `Sequence` objects (rlhf.serve.sequence): `submit` queues them, the
worker calls each one's `emit` with `Delta`s (from its own thread: the callback must be thread-safe), and a
request that goes away sets `cancelled`, which frees its row at the next step.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.engine import decode_cache
from rlhf.engine.decode_batch import DecodeBatch
from rlhf.engine.decode_cache import DecodeStep
from rlhf.engine.decoding import left_pad, never_sampled
from rlhf.engine.sampling import RowSampling, RowStreams, sample
from rlhf.models.loading import context_length
from rlhf.models.tokens import stop_ids
from rlhf.serve import metrics
from rlhf.serve.detokenize import decode
from rlhf.serve.logprobs import TokenLogprob, sampled_logprobs
from rlhf.serve.sequence import Delta, Overloaded, Sequence, leading_space, safe_length

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    """The running rows: their sequences, cache, masks and positions, and the token each one sampled last (not
    yet in the cache)."""

    seqs: list[Sequence]
    decoding: DecodeBatch
    next_ids: Tensor  # (B,)

    def join(self, other: _Batch) -> _Batch:
        """This batch's rows, then `other`'s."""
        self.decoding.join(other.decoding)
        self.seqs = self.seqs + other.seqs
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        return self


class Engine:
    """Owns `model` on a background thread; `submit` sequences to it from any thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        max_batch_size: int = 32,
        batch_wait_s: float = 0.005,
        max_queue: int = 1024,
        seed: int = 0,
    ) -> None:
        self.model = model.eval()
        self.context = context_length(self.model)
        # the attention of every batch's decoding steps over a SlotCache, where the model has that path
        self.decode_step = _decode_step(self.model, self.context)
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.stop_ids = stop_ids(tokenizer)  # EOS and the chat template's end-of-turn token
        self.vocab_size = int(self.model.config.vocab_size)  # the token ids a prompt may hold
        self.pad_id = int(tokenizer.pad_token_id)
        self.never = never_sampled(self.pad_id, self.stop_ids, self.model)  # PAD, and rows without text
        self.device = next(model.parameters()).device
        self.batch_sizes: Counter[int] = Counter()  # decode steps by number of rows, for tests and /metrics
        self._rng = torch.Generator().manual_seed(seed)  # random streams of unseeded rows
        self._incoming: queue.Queue[Sequence | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"rlhf-serve-{name}", daemon=True)
        self._window_start, self._window_tokens = time.perf_counter(), 0

    # ---- called from request handlers -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._incoming.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, seqs: list[Sequence]) -> None:
        if self._incoming.qsize() + len(seqs) > self.max_queue:
            raise Overloaded(f"{self.name}: more than {self.max_queue} sequences waiting")
        for seq in seqs:
            self._incoming.put(seq)
        metrics.QUEUE_DEPTH.labels(self.name).set(self._incoming.qsize())

    # ---- the worker thread --------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        batch: _Batch | None = None
        while True:
            # 1. admit waiting sequences (block when idle; when running, take what is there)
            room = self.max_batch_size - (len(batch.seqs) if batch else 0)
            if batch is not None and not batch.decoding.joinable:
                room = 0
            new, stopping = self._take(room, block=batch is None)
            new = [s for s in new if not s.cancelled]
            # 2. prefill the newcomers and join them to the running batch; a row that fails fails alone
            joined = self._prefill_isolated(new) if new else None
            if joined is not None:
                try:
                    batch = self._prune(joined if batch is None else batch.join(joined))
                except Exception as e:  # out of memory joining: fail these requests, keep serving
                    self._fail((batch.seqs if batch else []) + joined.seqs, e)
                    batch = None
            # 3. one decode step for every running row
            if batch is not None:
                running = batch.seqs
                try:
                    batch = self._prune(self._decode(batch))
                except Exception as e:  # a bug or out of memory in the shared step: no row to blame
                    self._fail(running, e)
                    batch = None
            if batch is None:
                metrics.TOKENS_PER_SECOND.labels(self.name).set(0)
            if stopping:
                return

    def _take(self, room: int, block: bool) -> tuple[list[Sequence], bool]:
        """Up to `room` waiting sequences; when idle, wait for one, then up to batch_wait_s for more."""
        taken: list[Sequence] = []
        deadline = None
        while len(taken) < room:
            try:
                if block and not taken:
                    item = self._incoming.get()
                    deadline = time.perf_counter() + self.batch_wait_s
                elif deadline is not None:
                    item = self._incoming.get(timeout=max(0.0, deadline - time.perf_counter()))
                else:
                    item = self._incoming.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return taken, True
            taken.append(item)
        metrics.QUEUE_DEPTH.labels(self.name).set(self._incoming.qsize())
        return taken, False

    def _prefill_isolated(self, seqs: list[Sequence]) -> _Batch | None:
        """Prefill the newcomers together; if that fails, each alone, so that one bad row (a prompt the
        model cannot take) fails only its own request. None when no row could start."""
        ok = []
        for seq in seqs:
            problem = self._refuse(seq)
            if problem is None:
                ok.append(seq)
            else:
                self._emit(seq, Delta(seq.index, "", error=f"generation failed: {problem}"))
        if not ok:
            return None
        try:
            batch: _Batch | None = self._prefill(ok)
        except Exception as e:
            if len(ok) == 1:
                self._fail(ok, e)
                return None
            batch = self._prefill_good(ok)
        if batch is None:
            return None
        try:
            return self._start(batch)
        except Exception as e:  # a bug reporting the first tokens: these rows fail, the worker serves on
            self._fail(batch.seqs, e)
            return None

    def _prefill_good(self, seqs: list[Sequence]) -> _Batch | None:
        """After a batch's prefill failed: fail the rows that fail alone, and prefill the others together."""
        good = []
        for seq in seqs:
            try:
                self._prefill([seq])
            except Exception as e:
                self._fail([seq], e)
                continue
            good.append(seq)
        if not good:
            return None
        try:
            return self._prefill(good)
        except Exception as e:  # out of memory together
            self._fail(good, e)
            return None

    def _refuse(self, seq: Sequence) -> str | None:
        """Why the model cannot take this row (the routers check these first; this keeps the batch safe
        from a caller that did not), or None."""
        if not seq.prompt_ids:
            return "empty prompt"
        if any(not 0 <= t < self.vocab_size for t in seq.prompt_ids):
            return "a prompt token id outside the vocabulary"
        if not 0 <= seq.params.top_k < 2**62:
            return f"top_k {seq.params.top_k} out of range"
        return None

    def _fail(self, seqs: list[Sequence], e: Exception) -> None:
        log.error("generation failed on %s for %d row(s)", self.name, len(seqs), exc_info=e)
        for seq in seqs:
            self._emit(seq, Delta(seq.index, "", error=f"generation failed: {e}"))

    def _prefill(self, seqs: list[Sequence]) -> _Batch:
        """The newcomers' prompts through the model, and their first tokens sampled (not yet reported: a row's
        first token is drawn from its own stream, the same again if this batch is dropped and made anew)."""
        ids, mask = (t.to(self.device) for t in left_pad([s.prompt_ids for s in seqs], self.pad_id))
        decoding = DecodeBatch(self.model, self.context, self.decode_step)
        logits = decoding.prefill(ids, mask)  # (B, V)
        return _Batch(seqs, decoding, self._sample(logits, seqs))

    def _start(self, batch: _Batch) -> _Batch:
        """Report the newcomers' first tokens."""
        metrics.PROMPT_TOKENS.labels(self.name).inc(sum(len(s.prompt_ids) for s in batch.seqs))
        now = time.perf_counter()
        for seq in batch.seqs:
            metrics.TIME_TO_FIRST_TOKEN.labels(self.name).observe(now - seq.enqueued_at)
        self._advance(batch)
        return batch

    def _decode(self, batch: _Batch) -> _Batch:
        logits = batch.decoding.step(batch.next_ids)  # (B, V)
        metrics.BATCH_SIZE.labels(self.name).observe(len(batch.seqs))
        self.batch_sizes[len(batch.seqs)] += 1
        batch.next_ids = self._sample(logits, batch.seqs)
        self._advance(batch)
        return batch

    def _sample(self, logits: Tensor, seqs: list[Sequence]) -> Tensor:
        for (
            seq
        ) in seqs:  # an unseeded row's stream is drawn from the engine's generator when it first samples
            if seq.stream_key is None:
                seq.stream_key = int(torch.randint(-(2**63), 2**63 - 1, (), generator=self._rng))
        device = logits.device
        params = [s.params for s in seqs]
        rows = RowSampling(
            torch.tensor([p.temperature for p in params], device=device),
            torch.tensor([p.top_k for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device),
        )
        keys = torch.tensor([s.stream_key for s in seqs], device=device)  # (B,)
        counters = torch.tensor([len(s.tokens) for s in seqs], device=device)  # (B,) the token each row draws
        # PAD (and rows past the tokenizer) never sampled: their probability is set to 0 before the draw
        tokens, _ = sample(logits, rows, RowStreams(keys, counters), self.never)
        asking = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if asking:  # each asking row's sampled token's log-prob, appended with the token
            top_n = [seqs[i].params.logprobs or 0 for i in asking]
            for i, entry in zip(asking, sampled_logprobs(logits, tokens, asking, top_n), strict=True):
                seqs[i].logprobs.pending = entry
        return tokens

    def _advance(self, batch: _Batch) -> None:
        """Append each row's new token, decide whether it is done, and report to its request."""
        new_tokens = batch.next_ids.tolist()
        self._count_tokens(len(new_tokens))
        for seq, token in zip(batch.seqs, new_tokens, strict=True):
            if seq.cancelled:
                continue
            seq.tokens.append(token)
            if token in self.stop_ids:
                seq.finish_reason = "stop"
            elif len(seq.tokens) >= seq.params.max_tokens:
                seq.finish_reason = "length"
            start = self._update_text(seq) if seq.tracks_text else 0
            seq.logprobs.place(start)
            if seq.finish_reason is not None:
                if not seq.tracks_text:
                    seq.text = decode(self.tokenizer, self._text_ids(seq))
                text = seq.text[seq.sent :]
                self._emit(
                    seq,
                    Delta(seq.index, text, seq.finish_reason, len(seq.tokens), logprobs=self._report(seq)),
                )
            elif seq.stream:
                ready = safe_length(seq.text, seq.params.stop)
                if ready > seq.sent:
                    self._emit(
                        seq, Delta(seq.index, seq.text[seq.sent : ready], logprobs=self._report(seq, ready))
                    )
                    seq.sent = ready

    def _report(self, seq: Sequence, ready: int | None = None) -> list[TokenLogprob] | None:
        """The log-probs a delta carries (None for rows that did not ask): while running, of the tokens whose
        text ends within the first `ready` characters; at the end, of the rest of the text's tokens."""
        if seq.params.logprobs is None:
            return None
        if ready is not None:
            return seq.logprobs.completed(ready, seq.decoded)
        ends_with_stop_token = bool(seq.tokens) and seq.tokens[-1] in self.stop_ids
        return seq.logprobs.remaining(seq.text, seq.cut, ends_with_stop_token)

    def _update_text(self, seq: Sequence) -> int:
        """Decode the text with the new token and cut it at a stop string; where the new token's text begins:
        the length of what the text before and after it share (a token that completes a character begun by
        the ones before begins where that character does). Work per token is bounded by the last tokens'
        text, not the whole answer's: the decoding is incremental, and only text the token may have changed
        is compared and searched for stop strings."""
        old, seq.text = seq.text, seq.detokenizer.update(self.tokenizer, self._text_ids(seq))
        kept = seq.detokenizer.kept
        begins = kept + len(os.path.commonprefix([old[kept:], seq.text[kept:]]))
        seq.decoded = len(seq.text)
        start = leading_space(seq.text) if seq.params.skip_leading_space else 0
        # a stop string found now has a character at or past `begins`: the text before it was searched already
        found = (seq.text.find(s, max(start, begins - len(s) + 1)) for s in seq.params.stop)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            seq.text = seq.text[:cut]
            seq.finish_reason = "stop"
            seq.cut = True
        return begins

    def _text_ids(self, seq: Sequence) -> list[int]:
        """The tokens the text is made of: not an ending stop token."""
        return seq.tokens[:-1] if seq.tokens and seq.tokens[-1] in self.stop_ids else seq.tokens

    def _prune(self, batch: _Batch) -> _Batch | None:
        """Drop finished and cancelled rows from the batch and cut padding-only slots off the cache."""
        keep = [i for i, s in enumerate(batch.seqs) if s.finish_reason is None and not s.cancelled]
        if not keep:
            return None
        if len(keep) < len(batch.seqs):
            index = torch.tensor(keep, device=self.device)
            if not batch.decoding.keep(index):
                raise RuntimeError("this model's KV cache cannot drop rows")
            batch.decoding.trim()
            batch.seqs = [batch.seqs[i] for i in keep]
            batch.next_ids = batch.next_ids[index]
        return batch

    def _emit(self, seq: Sequence, delta: Delta) -> None:
        try:
            seq.emit(delta)
        except RuntimeError:  # the request's event loop is gone (server shutting down)
            seq.cancelled = True

    def _count_tokens(self, n: int) -> None:
        metrics.GENERATED_TOKENS.labels(self.name).inc(n)
        self._window_tokens += n
        elapsed = time.perf_counter() - self._window_start
        if elapsed >= 1.0:
            metrics.TOKENS_PER_SECOND.labels(self.name).set(self._window_tokens / elapsed)
            self._window_start, self._window_tokens = time.perf_counter(), 0


def _decode_step(model: PreTrainedModel, context: int) -> DecodeStep | None:
    """What the decoding steps over a `SlotCache` run with, shared by every batch; None where the model decodes
    over `DynamicCache`. Its weights are not packed: the batch size changes at every admission and exit, and
    in the load test (docs/performance.md) weights packed once for the largest batch, or per power-of-two
    batch size, were slower with few clients and no clearly faster with many."""
    return DecodeStep(model, None) if decode_cache.supports(model, context) else None

"""Prometheus metrics of the labeling server (process-wide, served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

VOTES = Counter("rlhf_label_votes_total", "Votes recorded (new, not replays)", ["source"])
VOTE_REPLAYS = Counter(
    "rlhf_label_vote_replays_total", "Vote requests answered from an earlier idempotency key"
)
VOTE_SECONDS = Histogram(
    "rlhf_label_vote_seconds",
    "Time to record a vote, transaction included",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
VOTE_BATCH = Histogram(
    "rlhf_label_vote_batch_size",
    "Votes stored per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

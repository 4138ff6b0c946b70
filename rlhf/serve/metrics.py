"""Prometheus metrics of the model server (process-wide, served at /metrics). Names start with rlhf_serve_."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter("rlhf_serve_requests_total", "HTTP requests answered", ["endpoint", "status"])
REQUEST_SECONDS = Histogram(
    "rlhf_serve_request_seconds",
    "Time from request to the end of the response (streams included)",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "rlhf_serve_time_to_first_token_seconds",
    "Time from queueing a sequence to its first sampled token",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("rlhf_serve_prompt_tokens_total", "Prompt tokens prefilled", ["model"])
GENERATED_TOKENS = Counter("rlhf_serve_generated_tokens_total", "Tokens sampled", ["model"])
TOKENS_PER_SECOND = Gauge(
    "rlhf_serve_tokens_per_second", "Tokens sampled per second over the last second or so", ["model"]
)
BATCH_SIZE = Histogram(
    "rlhf_serve_batch_size",
    "Rows in each decode step",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_DEPTH = Gauge("rlhf_serve_queue_depth", "Sequences waiting for a batch slot", ["model"])
AB_RESPONSES = Counter("rlhf_serve_ab_responses_total", "Responses that carried an A/B pair", ["endpoint"])
FEEDBACK = Counter(
    "rlhf_serve_feedback_total", "A/B choices received", ["choice", "result"]
)  # result: recorded | replayed

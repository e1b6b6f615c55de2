"""Prometheus metrics of one server instance, in a registry the instance owns.

Nothing is registered in prometheus_client's global default registry, so several apps (tests, or two
models in one process) keep separate counts. ``GET /metrics`` renders :meth:`Metrics.render`.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: CPU prefill of a short prompt is ~10 ms on a tiny model and tens of seconds for 8k tokens.
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)  # requests per run; le="1.0" counts the runs of one

ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/tokensieve/select",
    "/health",
    "/metrics",
    "/",
)


def endpoint_label(path: str) -> str:
    """The path for known endpoints, ``other`` for anything else (bounded label values)."""
    return path if path in ENDPOINTS else "other"


class Metrics:
    """Counters, gauges and histograms of one server; ``render()`` gives the Prometheus text."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "tokensieve_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "tokensieve_request_duration_seconds",
            "end-to-end time of a completion request, arrival to last byte (streams included)",
            ["endpoint"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.jobs = Counter(
            "tokensieve_jobs",
            "generation jobs that ended, by outcome: completed, cancelled (client went away), timeout, rejected (bad input), failed (server error), shutdown (ended by a shutdown)",
            ["outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "tokensieve_ttft_seconds",
            "model time to first token (prefill + first token), by method",
            ["method"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "tokensieve_queue_wait_seconds",
            "time a request waited in the queue before its generation started",
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tokensieve_prompt_tokens", "prompt tokens of completed requests, by method", ["method"], registry=r
        )
        self.kept_tokens = Counter(
            "tokensieve_kept_tokens",
            "prompt tokens the model computed on (after selection/eviction), by method",
            ["method"],
            registry=r,
        )
        self.kv_kept = Counter(
            "tokensieve_kv_kept",
            "KV entries kept after the prefill (the fullest layer: an evicting method's budget), by method",
            ["method"],
            registry=r,
        )
        self.kept_ratio = Histogram(
            "tokensieve_kept_ratio",
            "kept / prompt tokens per completed request, by method",
            ["method"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "tokensieve_generated_tokens",
            "tokens generated, by job outcome (cancelled jobs count what they made before stopping)",
            ["outcome"],
            registry=r,
        )
        self.prefix_lookups = Counter(
            "tokensieve_prefix_cache_lookups",
            "prefills that used the prefix cache, by result: hit (reused at least one token) or miss",
            ["result"],
            registry=r,
        )
        self.prefix_cached_tokens = Counter(
            "tokensieve_prefix_cached_tokens",
            "prompt tokens taken from the prefix cache instead of computed",
            registry=r,
        )
        self.prefix_bytes = Gauge("tokensieve_prefix_cache_bytes", "bytes held by the prefix cache", registry=r)
        self.prefix_entries = Gauge("tokensieve_prefix_cache_entries", "prefixes held by the prefix cache", registry=r)
        self.prefix_evictions = Counter(
            "tokensieve_prefix_cache_evictions",
            "prefixes dropped (least recently used) to stay within the cache's size",
            registry=r,
        )
        self.queue_depth = Gauge("tokensieve_queue_depth", "requests waiting for the worker", registry=r)
        self.running = Gauge(
            "tokensieve_running_requests", "requests being generated now (0, 1, or a batch's size)", registry=r
        )
        self.batch_size = Histogram(
            "tokensieve_batch_size",
            "requests generated together in one run (1: alone; more with --max-batch)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The registry as Prometheus text, with its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

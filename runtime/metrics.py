"""What a serving process reports at GET /metrics, in Prometheus' text format (prometheus_client): requests by
endpoint and status, prompt and completion tokens, the engine's queue depth, running batch size and KV cache, and
time-to-first-token and per-token latency as clients see them. Each app has its own registry, so that several
apps in one process (tests, Ray Serve replicas) do not share counters."""
import time
from typing import AsyncIterator, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few ms per token on a GPU to tens of seconds for a long prompt on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServingMetrics:
    def __init__(self, endpoints: Iterable[str]):
        self.registry = CollectorRegistry()
        self.endpoints = set(endpoints)  # others are counted as "other": a label per scanned URL would grow forever
        self.requests = Counter("chatglm_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("chatglm_prompt_tokens", "prompt tokens of the requests generated",
                                     registry=self.registry)
        self.completion_tokens = Counter("chatglm_completion_tokens", "tokens generated", registry=self.registry)
        self.queue_depth = Gauge("chatglm_queue_depth", "requests waiting for a place in the batch",
                                 registry=self.registry)
        self.batch_size = Gauge("chatglm_running_batch_size", "requests generating now", registry=self.registry)
        self.time_to_first_token = Histogram("chatglm_time_to_first_token_seconds",
                                             "from a request's submission to its first token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.time_per_token = Histogram("chatglm_time_per_output_token_seconds", "between a reply's tokens",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)

    def watch(self, engine) -> "ServingMetrics":
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.batch_size.set_function(lambda: engine.batch_size)
        cache = engine.cache
        Gauge("chatglm_kv_cache_bytes", "memory of the KV cache (--kv-cache-gb)",
              registry=self.registry).set(cache.bytes)
        Gauge("chatglm_kv_cache_blocks_used", f"KV cache blocks ({cache.block_size} tokens each) in use",
              registry=self.registry).set_function(lambda: cache.num_blocks - cache.num_free)
        Gauge("chatglm_kv_cache_blocks", "KV cache blocks in all", registry=self.registry).set(cache.num_blocks)
        return self

    async def timed(self, tokens: AsyncIterator) -> AsyncIterator:
        """The items of `tokens`, timing the first one and the gaps between the rest."""
        last, first = time.perf_counter(), True
        async for token in tokens:
            now = time.perf_counter()
            (self.time_to_first_token if first else self.time_per_token).observe(now - last)
            last, first = now, False
            yield token

    def render(self) -> tuple:
        """(body, content type) of the /metrics answer."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestCounter:
    """ASGI middleware counting every HTTP answer by endpoint and status (rejections by other middleware too,
    when it is added last, i.e. outermost)."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.metrics.endpoints else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)

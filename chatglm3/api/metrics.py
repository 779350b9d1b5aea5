"""GET /metrics: the server's counters for Prometheus, through prometheus_client. Names are
vLLM's where they mean the same, so dashboards made for vLLM read this server too:

- vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc (gauges,
  read from the engine at each scrape; running counts the prefilling requests too);
- vllm:prompt_tokens_total, vllm:generation_tokens_total, vllm:request_success_total
  {finished_reason: stop | length | abort | error}, vllm:prefix_cache_queries_total and
  vllm:prefix_cache_hits_total (prompt tokens looked up / found in the prefix cache);
- vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds and
  vllm:e2e_request_latency_seconds (histograms; inter-token latency is observed once per
  request, at its mean, when it ends: vLLM observes every token, so its count there is
  tokens, here requests; one observation keeps a 30k-token request's end O(1));
- chatglm3:http_errors_total{status}: requests answered with an error status.
Every series carries `model_name`. The registry is the app's own (not the process-wide
default), so each app counts only its requests.
"""

from __future__ import annotations

import time
from typing import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, \
    generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.output import GenerationResult
from .responses import FINISH_REASONS

# vLLM's buckets (seconds), so its dashboards' quantiles mean the same here.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Our stop reasons as vLLM's finished_reason label: OpenAI's finish reasons, and its own two.
REASONS = {**FINISH_REASONS, "cancelled": "abort", "error": "error"}


class _EngineGauges(Collector):
    """The engine's queue and cache, read when Prometheus scrapes."""

    def __init__(self, engine, model: str) -> None:
        self.engine, self.model = engine, model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.engine.stats()
        for name, doc, value in (
                ("vllm:num_requests_running", "Requests prefilling or decoding.",
                 s.running + s.prefilling),
                ("vllm:num_requests_waiting", "Requests waiting for a KV cache row.", s.waiting),
                ("vllm:kv_cache_usage_perc", "Share of the KV cache's positions in use "
                 "(1 = full; a CPU's growing cache: of what it has now).",
                 s.kv_used / max(1, s.kv_rows * s.kv_capacity))):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model], value)
            yield family


class Metrics:
    """The counters of one app; `ended` is called from the engine's worker thread."""

    def __init__(self, engine, model: str) -> None:
        self.model = model
        self.registry = r = CollectorRegistry()
        label = ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens (cached ones too).",
                                     label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", label,
                                         registry=r)
        self.success = Counter("vllm:request_success", "Requests ended, by reason.",
                               label + ["finished_reason"], registry=r)
        self.cache_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in "
                                     "the prefix cache.", label, registry=r)
        self.cache_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix "
                                  "cache.", label, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              label, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between two tokens of "
                             "a request.", label, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from a request's "
                             "arrival to its end.", label, buckets=E2E_BUCKETS, registry=r)
        self.http_errors = Counter("chatglm3:http_errors", "Requests answered with an error "
                                   "status.", label + ["status"], registry=r)
        r.register(_EngineGauges(engine, model))

    def ended(self, result: GenerationResult, arrived: float) -> None:
        """A choice ended (`arrived`: time.perf_counter() when its request came in)."""
        m = self.model
        self.success.labels(m, REASONS.get(result.stop_reason, "abort")).inc()
        self.e2e.labels(m).observe(time.perf_counter() - arrived)
        n = result.output_token_count
        if not n:
            return  # ended before its prompt ran
        self.prompt_tokens.labels(m).inc(result.input_token_count)
        self.cache_queries.labels(m).inc(result.input_token_count)
        self.cache_hits.labels(m).inc(result.cached_input_token_count)
        self.generation_tokens.labels(m).inc(n)
        self.ttft.labels(m).observe(result.time_to_first_token)
        if n > 1 and result.tokens_per_second > 0:
            self.itl.labels(m).observe(1 / result.tokens_per_second)

    def http_error(self, status: int) -> None:
        self.http_errors.labels(self.model, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

"""quiver's own Prometheus metrics, per adapter, so users can watch cost; one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# The `*_created` series double every counter's output for little use.
disable_created_metrics()

# The one label value for every request whose model did not resolve (label values come only from the registry).
UNKNOWN_MODEL = "unknown"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "quiver_requests", "Generation requests by model asked for, adapter, endpoint and HTTP status.",
            ["model", "adapter", "endpoint", "status"], registry=r,
        )
        self.prompt_tokens = Counter("quiver_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r)
        self.completion_tokens = Counter(
            "quiver_completion_tokens", "Completion tokens generated (streaming included).", ["adapter"], registry=r
        )
        self.request_duration = Histogram(
            "quiver_request_duration_seconds", "End-to-end request latency.", ["adapter"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            "quiver_time_to_first_token_seconds", "Time to the first streamed chunk.", ["adapter"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.adapters_registered = Gauge("quiver_adapters_registered", "Adapters in the registry.", registry=r)
        self.adapter_loads = Counter(
            "quiver_adapter_loads", "Adapter versions loaded into the engine.", ["adapter"], registry=r
        )
        self.engine_up = Gauge("quiver_engine_up", "1 while the vLLM engine is healthy.", registry=r)
        self.queue_depth = Gauge("quiver_queue_depth", "Generation requests waiting for a slot in the gateway.",
                                 registry=r)
        self.rejected_requests = Counter(
            "quiver_rejected_requests", "Requests turned away before the engine (overload, draining).", ["reason"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

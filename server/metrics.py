"""quiver's own Prometheus metrics, per adapter, so users can watch cost; one registry per app."""

from __future__ import annotations

from contextlib import suppress

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
        # Per version (`name@N`, or the base model's name): what each version costs and how it fares, e.g. a
        # canary against the current version. Label values come only from the registry's resolved targets,
        # and a deleted version's series are removed (`forget_version`): the label set stays bounded.
        self.version_requests = Counter(
            "quiver_version_requests", "Generation requests by the version that answered and HTTP status.",
            ["version", "status"], registry=r,
        )
        self.version_errors = Counter(
            "quiver_version_errors", "Requests failed by the version (5xx, or the engine could not load it); "
            "the caller's own 4xx are not counted.", ["version"], registry=r,
        )
        self.version_prompt_tokens = Counter("quiver_version_prompt_tokens", "Prompt tokens processed.", ["version"],
                                             registry=r)
        self.version_completion_tokens = Counter(
            "quiver_version_completion_tokens", "Completion tokens generated (streaming included).", ["version"],
            registry=r,
        )
        self.version_request_duration = Histogram(
            "quiver_version_request_duration_seconds", "End-to-end request latency.", ["version"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.canary_rollbacks = Counter(
            "quiver_canary_rollbacks", "Canaries ended automatically for their error rate.", ["adapter"], registry=r,
        )
        self._version_statuses: dict[str, set[str]] = {}

    def count_version_request(self, version: str, status: str, error: bool, duration_s: float | None) -> None:
        self._version_statuses.setdefault(version, set()).add(status)
        self.version_requests.labels(version, status).inc()
        if error:
            self.version_errors.labels(version).inc()
        if duration_s is not None:
            self.version_request_duration.labels(version).observe(duration_s)

    def forget_version(self, version: str) -> None:
        """Drop a deleted version's series (its numbers are never given out again)."""
        for status in self._version_statuses.pop(version, ()):
            with suppress(KeyError):
                self.version_requests.remove(version, status)
        for metric in (self.version_errors, self.version_prompt_tokens, self.version_completion_tokens,
                       self.version_request_duration):
            with suppress(KeyError):
                metric.remove(version)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Request ids, log formats and offline API docs. The app-level checks run in-process without an engine; the
request id's trip through the real vLLM engine runs on the shared server with the official client."""

from __future__ import annotations

import json
import logging
import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from conftest import QuiverServer
from quiver.app import create_app
from quiver.observability import RequestIdFilter, current_request_id, log_formatter
from quiver.settings import Settings

log = logging.getLogger("quiver.test_observability")


@pytest.fixture
def app(tmp_path):
    app = create_app(Settings(store_dir=tmp_path / "adapters", state_dir=tmp_path / "run"))

    @app.get("/test-logs")
    async def logs_something() -> dict[str, str | None]:
        log.warning("working on it")
        return {"seen": current_request_id()}

    return app


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)  # not entered: no lifespan, so no engine is started


def test_a_request_id_is_made_when_none_is_given(client: TestClient) -> None:
    first, second = client.get("/health"), client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_the_callers_request_id_is_kept_and_seen_by_the_route(client: TestClient) -> None:
    given = "Root=1-67891233-abcdef012345678912345678;Parent=53995c3f42cd8ad8"  # an AWS ALB trace id
    response = client.get("/test-logs", headers={"X-Request-ID": given})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == given
    assert response.json() == {"seen": given}
    # Outside a request there is none.
    assert current_request_id() is None


@pytest.mark.parametrize("bad", ["", "x" * 129, "two words", "a\tb", "quote\"d", "<script>", "é"])
def test_a_bad_request_id_is_refused_in_the_envelope(client: TestClient, bad: str) -> None:
    response = client.get("/health", headers={"X-Request-ID": bad.encode("utf-8")})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": response.json()["error"]["message"], "type": "invalid_request_error",
                                        "param": "X-Request-ID", "code": "invalid_request_id"}
    # The refusal still carries an id, a fresh one of ours, never the rejected text.
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_refusals_by_other_middleware_carry_the_id_too(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", content=b"x" * (5 * 1024 * 1024),
                           headers={"X-Request-ID": "big-body-1", "Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.headers["x-request-id"] == "big-body-1"


def test_json_log_lines_carry_the_request_id(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    formatter = log_formatter("json")
    with caplog.at_level(logging.INFO, logger=log.name):
        caplog.handler.addFilter(RequestIdFilter())
        client.get("/test-logs", headers={"X-Request-ID": "req-42"})
        log.info("between requests")
    lines = [json.loads(formatter.format(record)) for record in caplog.records if record.name == log.name]
    assert lines[0]["message"] == "working on it" and lines[0]["request_id"] == "req-42"
    assert lines[0]["level"] == "WARNING" and lines[0]["logger"] == log.name and lines[0]["time"]
    assert lines[1]["message"] == "between requests" and lines[1]["request_id"] == "-"
    # Plain text stays the default, with the id in brackets.
    text = log_formatter("text").format(caplog.records[0])
    assert "[req-42]: working on it" in text


def test_log_format_setting() -> None:
    assert Settings().log_format == "text"
    assert Settings(log_format="json").log_format == "json"
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_only_local_assets(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    parser = _Assets()
    parser.feed(response.text)
    # Scripts set from JS too (redoc's spec url, swagger's `url:`): any absolute http(s) URL is a CDN.
    assert not re.search(r"https?://", response.text), "the page names an outside URL"
    assert parser.urls, "no assets found: the page would be blank"
    for url in parser.urls:
        assert url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url
    assert client.get("/openapi.json").status_code == 200


def test_the_request_id_reaches_the_engine(quiver_server: QuiverServer) -> None:
    openai_client = quiver_server.openai()
    raw = openai_client.chat.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        extra_headers={"X-Request-ID": "ops-trace-7f3a"})
    assert raw.headers["x-request-id"] == "ops-trace-7f3a"
    # vLLM names its completion after the request id it was given: the engine saw ours.
    assert raw.parse().id == "chatcmpl-ops-trace-7f3a"

    streamed = openai_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
        extra_headers={"X-Request-ID": "ops-stream-1"})
    assert {chunk.id for chunk in streamed} == {"chatcmpl-ops-stream-1"}
    # The gateway's access log line names it too.
    assert "[ops-trace-7f3a]" in quiver_server.log_path.read_text(errors="replace")


# ------------------------------------------------------------------------------- the Grafana dashboard


def test_the_dashboard_queries_only_series_quiver_exposes() -> None:
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    from quiver.metrics import Metrics

    metrics = Metrics()
    # One sample of every labelled series, so each appears in the exposition with its labels.
    metrics.requests.labels(model="m", adapter="a", endpoint="chat/completions", status="200").inc()
    for family in (metrics.prompt_tokens, metrics.completion_tokens, metrics.adapter_loads):
        family.labels(adapter="a").inc()
    metrics.request_duration.labels(adapter="a").observe(0.1)
    metrics.time_to_first_token.labels(adapter="a").observe(0.1)
    metrics.rejected_requests.labels(reason="overloaded").inc()
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    # The engine's series the dashboard uses (names from vLLM's own metrics module).
    from importlib.util import find_spec

    vllm_source = Path(find_spec("vllm").origin).parent / "v1" / "metrics" / "loggers.py"  # read, not imported
    scrape_labels = {"namespace", "job", "pod", "instance"}  # added by Prometheus, not by quiver

    dashboard = json.loads((Path(__file__).parents[1] / "helm/quiver/dashboards/quiver.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    per_adapter = [e for e in exprs if "adapter" in e]
    assert any("quiver_requests_total" in e for e in per_adapter)  # traffic
    assert any("quiver_request_duration_seconds_bucket" in e for e in per_adapter)  # latency
    assert any('status!~"2.."' in e for e in per_adapter)  # errors
    for expr in exprs:
        for name in re.findall(r"\b(quiver_[a-z_]+|vllm:[a-z_:]+)", expr):
            if name.startswith("vllm:"):
                assert f'"{name}"' in vllm_source.read_text(), f"vLLM has no series {name}"
                continue
            assert name in exposed, f"{name} is not a series quiver exposes: {sorted(exposed)}"
            labels = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr))
            for group in re.findall(r"by \(([^)]*)\)", expr):
                labels |= {label.strip() for label in group.split(",")}
            missing = labels - exposed[name] - scrape_labels
            assert not missing, f"{expr}: {name} has no label {missing}"


# ------------------------------------------------------------------------------------------- tracing


def test_tracing_makes_a_span_per_request_joining_the_callers_trace(tmp_path, monkeypatch) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from quiver import app as app_module

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    real_install = app_module.install_tracing
    monkeypatch.setattr(app_module, "install_tracing",
                        lambda app, endpoint: real_install(app, endpoint, tracer_provider=provider))
    app = create_app(Settings(store_dir=tmp_path / "adapters", state_dir=tmp_path / "run",
                              otlp_endpoint="http://127.0.0.1:4318"))
    seen: dict[str, str] = {}

    @app.get("/test-engine-headers")
    async def engine_call() -> dict[str, str]:
        from quiver.observability import engine_headers

        seen.update(engine_headers())
        return {}

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = TestClient(app).get("/test-engine-headers", headers={
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Request-ID": "traced-1"})
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, [s.name for s in spans]
    span = spans[0]
    assert format(span.context.trace_id, "032x") == trace_id  # joined the caller's trace
    assert span.attributes["quiver.request_id"] == "traced-1"
    assert span.attributes.get("http.route") == "/test-engine-headers" or "/test-engine-headers" in span.name
    # What the engine would get: the id, and a traceparent in the same trace under our span.
    assert seen["X-Request-ID"] == "traced-1"
    assert seen["traceparent"].split("-")[1] == trace_id
    assert seen["traceparent"].split("-")[2] == format(span.context.span_id, "016x")


def test_tracing_is_off_without_an_endpoint(monkeypatch) -> None:
    from quiver.observability import tracing_endpoint

    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert tracing_endpoint(None) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert tracing_endpoint(None) == "http://collector:4318"
    assert tracing_endpoint("http://mine:4318") == "http://mine:4318"


def test_a_served_request_logs_json_lines_with_its_id(tmp_path) -> None:
    """Through uvicorn configured as `quiver serve` configures it: its access line is JSON with the id."""
    import io
    import threading
    import time

    import httpx
    import uvicorn

    from conftest import free_port
    from quiver.app import uvicorn_config
    from quiver.observability import configure_logging

    settings = Settings(store_dir=tmp_path / "adapters", state_dir=tmp_path / "run", port=free_port())
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    config.lifespan = "off"  # no engine for this check
    server = uvicorn.Server(config)
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging("json", stream=stream)
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        response = httpx.get(f"http://127.0.0.1:{settings.port}/health", headers={"X-Request-ID": "json-line-1"})
        assert response.headers["x-request-id"] == "json-line-1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]  # every line is JSON
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert access and access[0]["request_id"] == "json-line-1" and "/health" in access[0]["message"]
    assert all(line["request_id"] == "-" for line in lines if line["logger"] == "uvicorn.error")

"""The console's pieces that need no engine: the metrics sampler's arithmetic and the page routes' safety."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from quiver.app import create_app
from quiver.auth import EVERY_MODEL, ModelScope
from quiver.console.router import MetricsSampler
from quiver.metrics import Metrics
from quiver.settings import Settings


def test_the_sampler_gives_per_adapter_rates_quantiles_and_error_rates_within_the_keys_scope() -> None:
    metrics, sampler = Metrics(), MetricsSampler()
    sampler.sample(metrics.registry)
    for status in ("200", "200", "200", "500"):
        metrics.requests.labels("acme-a", "acme-a", "chat/completions", status).inc()
    for seconds in (0.02, 0.03, 0.2, 3.0):
        metrics.request_duration.labels(adapter="acme-a").observe(seconds)
    metrics.requests.labels("base", "base", "chat/completions", "200").inc()
    metrics.requests.labels("globex-b", "globex-b", "chat/completions", "200").inc()

    series = sampler.series(metrics.registry, EVERY_MODEL, base_model="base")
    [point] = series["acme-a"]
    assert (point["requests"], point["error_rate"]) == (4, 0.25)
    assert (point["p50_s"], point["p99_s"]) == (0.05, 5.0)  # the bounds of the buckets holding them
    assert set(series) == {"acme-a", "base", "globex-b"}

    scoped = sampler.series(metrics.registry, ModelScope(("acme-*",)), base_model="base")
    assert set(scoped) == {"acme-a", "base"}  # the base is open to every key; globex's traffic is not shown

    sampler.sample(metrics.registry)
    quiet = sampler.series(metrics.registry, EVERY_MODEL, base_model="base")["acme-a"][-1]
    assert (quiet["requests"], quiet["error_rate"], quiet["p50_s"]) == (0, None, None)  # no traffic since


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(Settings(admin_keys=["k"])))  # no lifespan: the pages need no engine


def test_root_redirects_to_the_console_and_its_files_are_served_with_a_strict_policy(client: TestClient) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/console/"
    page = client.get("/console/")
    assert page.status_code == 200 and "app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/console/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/console/#/playground").status_code == 200


@pytest.mark.parametrize("path", ["/console/../pyproject.toml", "/console/..%2Frouter.py", "/console/router.py",
                                  "/console/static/app.js.map", "/console/%2e%2e/%2e%2e/pyproject.toml"])
def test_only_the_consoles_own_files_are_served(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"  # the envelope, never a file's bytes


def test_the_new_routes_need_a_key(client: TestClient) -> None:
    assert client.get("/v1/metrics/summary").json()["error"]["code"] == "missing_api_key"
    assert client.post("/v1/files/check").status_code == 401
    assert client.get("/v1/fine_tuning/jobs/ftjob-x/manifest").status_code == 401


def test_the_data_check_reads_preference_data_as_the_upload_does(model_dir, tmp_path) -> None:
    """The console's check takes the format from the first line, as uploads and `quiver data check` do."""
    import json

    from quiver.console.router import _check

    pair = {"input": {"messages": [{"role": "user", "content": "What is 2+2?"}]},
            "preferred_output": [{"role": "assistant", "content": "4"}],
            "non_preferred_output": [{"role": "assistant", "content": "Let me think. It is 4, I believe."}]}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({**pair, "input": {"messages": [
        {"role": "user", "content": f"What is 2+{n}?"}]}}) + "\n" for n in range(12)))
    check = _check(path, model_dir)
    assert check.ok and check.examples == 12, check.findings
    assert check.tokens is not None

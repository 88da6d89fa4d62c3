"""Smoke run of the load generator (loadtests/) against the session server: a few streamed requests over the
base and two adapters; the report must be complete and error-free. No timing assertions."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `loadtests`

from loadtests import report  # noqa: E402
from loadtests.loadgen import Workload, run_workload  # noqa: E402


def test_loadgen_smoke(quiver_server, lora_adapters, tmp_path):
    for name, folder in (("smoke-lg-a", lora_adapters.random_a), ("smoke-lg-b", lora_adapters.random_b)):
        response = quiver_server.register(name, folder)
        assert response.status_code in (200, 201), response.text
    work = Workload(base_url=quiver_server.base_url, model=quiver_server.model_name, api_key=quiver_server.api_key,
                    shape="distinct", adapters=["smoke-lg-a", "smoke-lg-b"], include_base=True, requests=6,
                    concurrency=3, prompt_tokens=12, max_tokens=6, duration_s=60, timeout_s=60, label="smoke")

    result = asyncio.run(run_workload(work))

    assert result["overall"]["requests"] == 6
    assert result["overall"]["errors"] == 0, result["overall"]["errors_by_status"]
    assert set(result["per_model"]) == {quiver_server.model_name, "smoke-lg-a", "smoke-lg-b"}
    assert all(s["requests"] == 2 and s["output_tokens"] == 12 for s in result["per_model"].values())
    assert report.is_complete(result)

    prefix = tmp_path / "smoke"
    report.write_all([result], prefix)
    assert json.loads((tmp_path / "smoke.json").read_text())["runs"][0]["overall"]["ok"] == 6
    table = (tmp_path / "smoke.md").read_text()
    assert "smoke-lg-a" in table and "TTFT" in table
    for plot in ("smoke-latency-cdf.png", "smoke-throughput.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_loadgen_refuses_remote_hosts():
    work = Workload(base_url="http://192.0.2.1:8000", model="m")  # TEST-NET-1: never loopback
    with pytest.raises(ValueError, match="loopback"):
        work.validate()

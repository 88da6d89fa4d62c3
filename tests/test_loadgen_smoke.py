"""Smoke run of the load generator (loadtests/) against the session server: a few streamed requests over the
base and two adapters; the report must be complete and error-free. No timing assertions."""

from __future__ import annotations

import asyncio
import json
import os
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


def test_rounds_rotate_their_order_and_ratios_pair_each_round(monkeypatch):
    from loadtests import compare

    speeds = {"base": [100.0, 50.0, 200.0], "lora": [97.0, 48.0, 190.0]}  # a machine whose speed swings by 4x
    order = []

    def fake_run(work):
        side, number = work.label.split(" #")
        order.append(side)
        return {"overall": {"output_tok_s": speeds[side][int(number) - 1]}}

    monkeypatch.setattr(compare, "run", fake_run)
    work = Workload(base_url="http://127.0.0.1:1", model="m")
    target = compare.Target(base_url=work.base_url, api_key="k", admin_key="k", engine_url=None, engine_key=None,
                            pid=None, out=Path("."), adapters_dir=Path("."), model_dir=Path("."), rounds=3,
                            work=work, summary={})
    runs = compare.alternate(target, {"base": work, "lora": work})

    assert order == ["base", "lora", "lora", "base", "base", "lora"]  # no side always runs first
    figures = compare.ratio_figures(compare.round_ratios(runs, "lora", "base"))
    assert figures["per_round"] == [0.97, 0.96, 0.95] and figures["round_median"] == 0.96
    low, high = figures["round_ci95"]
    assert 0.95 <= low <= 0.96 <= high <= 0.97
    assert compare.paired_line(figures) == ("round by round: median 0.96x, 95 % CI "
                                            f"{low}-{high}; per round [0.97, 0.96, 0.95]")


def test_the_floor_probe_splits_the_gateways_extra_time(quiver_server, tmp_path):
    """`compare gateway`'s smallest-request probe end to end on the session server: a bare pass-through proxy
    (`loadtests.bare_proxy`) started in front of the engine, rows of direct / proxy / gateway requests, each
    difference's median inside its own bootstrap interval; the proxy is stopped afterwards. No timing targets."""
    from loadtests import compare
    from loadtests.bare_proxy import KEY_ENV

    probe = Workload(base_url=quiver_server.base_url, model=quiver_server.model_name, api_key=quiver_server.api_key,
                     shape="base", requests=1, concurrency=1, prompt_tokens=1, max_tokens=1, endpoint="completions",
                     timeout_s=60)
    target = compare.Target(base_url=quiver_server.base_url, api_key=quiver_server.api_key,
                            admin_key=quiver_server.admin_key, engine_url=quiver_server.engine_url,
                            engine_key=quiver_server.engine_key, pid=None, out=tmp_path, adapters_dir=tmp_path,
                            model_dir=tmp_path, rounds=1, work=probe, summary={}, pairs=6)

    figures = compare.floor_probe(target, probe)

    assert figures["floor_rows"] == 6, figures  # every row complete: the proxy relayed each stream
    assert figures["floor_direct_ttft_p50_ms"] > 0
    for name in ("gateway_extra", "bare_extra", "gateway_over_bare"):
        low, high = figures[f"floor_{name}_ci95_ms"]
        assert low <= figures[f"floor_{name}_ms"] <= high, (name, figures)
    assert KEY_ENV not in os.environ  # the engine's key went to the proxy's environment only


def test_the_bare_proxy_relays_the_engines_answer_untouched(quiver_server):
    import httpx

    from loadtests.bare_proxy import serving

    with serving(quiver_server.engine_url, quiver_server.engine_key) as proxy_url:
        body = {"model": quiver_server.model_name, "prompt": "The sea is", "max_tokens": 5, "temperature": 0,
                "stream": True}
        through = httpx.post(f"{proxy_url}/v1/completions", json=body, timeout=60)
        direct = httpx.post(f"{quiver_server.engine_url}/v1/completions", json=body, timeout=60,
                            headers={"Authorization": f"Bearer {quiver_server.engine_key}"})
        assert through.status_code == direct.status_code == 200
        assert through.headers["content-type"] == direct.headers["content-type"]

        def texts(response: httpx.Response) -> list[str]:
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            return [json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]"]

        assert texts(through) == texts(direct) and len(texts(through)) == 5
        unknown = httpx.get(f"{proxy_url}/v1/no-such-route", timeout=30)
        assert unknown.status_code == 404  # the engine's answer, passed on as is

"""The one-command comparison suite (issue #18, item 6): the device is detected, the GPU settings are what a
CUDA machine gets, and the whole code path runs on CPU (quick counts) with a real engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import suite
from loadtests.peft_baseline import device_and_dtype

REPO = Path(__file__).resolve().parents[1]


def test_device_settings() -> None:
    assert device_and_dtype("cpu") == ("cpu", "float32")
    assert device_and_dtype("cuda") == ("cuda", "bfloat16")
    assert suite.settings_for("cuda") == {"QUIVER_DTYPE": "bfloat16"}
    assert suite.settings_for("cpu") == {"QUIVER_DTYPE": "float32"}
    detected, _ = device_and_dtype("auto")
    import torch

    assert detected == ("cuda" if torch.cuda.is_available() else "cpu")


def test_full_plan_runs_every_benchmark(tmp_path: Path) -> None:
    plan = dict(suite.commands(tmp_path, quick=False))
    assert set(plan) == {"cold_start", "compare", "many_adapters"}
    assert "all" in plan["compare"]
    assert plan["many_adapters"].count("--config") == 2


@pytest.mark.engine
def test_quick_suite_runs_on_cpu(tmp_path: Path) -> None:
    """The suite's code path end to end (three servers, one after the other), tiny counts, CPU."""
    out = tmp_path / "suite"
    done = subprocess.run([sys.executable, "-m", "loadtests.suite", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    logs = {p.name: p.read_text(errors="replace")[-3000:] for p in out.glob("*.log")}
    assert done.returncode == 0, (done.stdout, logs)
    assert (out / "suite.txt").read_text().startswith("device cpu, dtype float32")
    cold = json.loads((out / "cold-start.json").read_text())
    assert cold["runs"][0]["ready_s"] > 0 and "model_loaded" in cold["runs"][0]["phases"]
    summary = json.loads((out / "compare" / "summary.json").read_text())
    assert {"mixed", "gateway", "peft", "hot", "scale"} <= set(summary)
    mixed = summary["mixed"]["figures"]
    assert mixed["ratio"] > 0 and mixed["adapter_only_ratio"] > 0, mixed  # both of #18's mixed figures
    assert all(len(mixed["paired"][name]["per_round"]) >= 1 for name in ("mixed", "adapter_only")), mixed
    gateway = summary["gateway"]["figures"]  # the smallest-request probe ran its three sides, the bare proxy included
    assert gateway["floor_rows"] > 0 and gateway["floor_direct_ttft_p50_ms"] > 0, gateway
    assert {"floor_gateway_extra_ms", "floor_bare_extra_ms", "floor_gateway_over_bare_ms"} <= set(gateway)
    assert gateway["paired_ratio"]["per_round"] and gateway["paired_ratio"]["round_median"] > 0, gateway
    peft = summary["peft"]["figures"]
    assert peft, summary["peft"]
    many = json.loads((out / "many-adapters" / "many-adapters.json").read_text())
    rows = many["summary"]["slots4"]
    assert set(rows) == {"uniform-4", "zipf-6"} and rows["zipf-6"]["errors"] == 0
    assert rows["zipf-6"]["tok_s"] > 0 and rows["zipf-6"]["peak_rss_gib"] > 0

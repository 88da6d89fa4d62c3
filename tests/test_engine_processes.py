"""The engine's processes (cold start, issue #18): with one device the model runs inside vLLM's engine-core
process, so a start imports vLLM and torch in two processes (API server, engine core) instead of three."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from quiver.engine import bound_cpus, engine_environment
from quiver.settings import Settings
from quiver.testing import QuiverServer


def test_one_device_keeps_the_model_in_the_engine_core_process(tmp_path: Path) -> None:
    env = engine_environment(Settings(state_dir=tmp_path), api_key="k", parent={})
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # One torch thread per bound core, as vLLM's own worker process gets (not the 1 it gives a scheduler).
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == f"0-{os.cpu_count() - 1}"
    assert env["OMP_NUM_THREADS"] == str(os.cpu_count())
    assert env["OMP_PLACES"] == "{" + ",".join(str(i) for i in range(os.cpu_count())) + "}"
    assert env["OMP_PROC_BIND"] == "true"


def test_an_operator_thread_count_wins_and_the_old_layout_stays_available(tmp_path: Path) -> None:
    env = engine_environment(Settings(state_dir=tmp_path), api_key="k", parent={"OMP_NUM_THREADS": "1"})
    assert env["OMP_NUM_THREADS"] == "1"
    off = engine_environment(Settings(state_dir=tmp_path, engine_worker_in_core=False), api_key="k", parent={})
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in off and "OMP_NUM_THREADS" not in off and "OMP_PLACES" not in off
    # Several devices need vLLM's worker processes.
    sharded = engine_environment(Settings(state_dir=tmp_path, tensor_parallel_size=2), api_key="k", parent={})
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in sharded


def test_bound_cpus_reads_vllms_bind_list() -> None:
    assert bound_cpus("0-3,6") == [0, 1, 2, 3, 6]
    assert bound_cpus("2") == [2]
    for unknown in ("", "auto", "nobind", "0-1|2-3", "x-y"):
        assert bound_cpus(unknown) is None


def _engine_processes(server: QuiverServer) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.process.pid).children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]


def test_the_served_engine_is_two_processes_and_serves(quiver_server: QuiverServer) -> None:
    processes = _engine_processes(quiver_server)
    titles = [" ".join(p.cmdline()) for p in processes]
    assert len(processes) == 2, titles  # vLLM's API server and its engine core, which runs the model
    assert not any("Worker" in title for title in titles), titles
    # The engine core (retitled VLLM::EngineCore, which overwrites its /proc environ) inherits the API
    # server's environment.
    api_server = next(p for p in processes if p.ppid() == quiver_server.process.pid)
    assert api_server.environ().get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    reply = quiver_server.openai(key=quiver_server.api_key).chat.completions.create(
        model=quiver_server.model_name, max_tokens=4, temperature=0, messages=[{"role": "user", "content": "Hi"}])
    assert reply.usage.completion_tokens >= 1 and reply.choices[0].message.content

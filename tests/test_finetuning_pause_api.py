"""Pause and resume through the official client, on gateways in process (fake engine) sharing one store: a folder
(a ReadWriteMany volume) or a bucket of a real S3 server process. The training worker is played by a process
that follows the worker's file protocol, pause included (it stops when the `pause` file appears, leaves a
resume point, and started again continues from it); the real trainer's pause is in test_finetuning_pause.py.
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
from pathlib import Path

import openai
import pytest

from quiver.fake_engine import FakeEngine
from quiver.finetuning.launcher import LocalRun
from quiver.settings import Settings
from quiver.testing import ADMIN_KEY, API_KEY, InProcessGateway
from s3_fixtures import MotoS3, running_s3_server

BASE = "SmolLM2-135M-Instruct"
EXAMPLES = Path(__file__).parent.parent / "examples" / "pirate.jsonl"

# Four steps; a checkpoint at steps 2 and 4 (the adapter handed in); a first run holds after step 2 until it
# is paused (or `release` appears). Paused, it leaves run/checkpoints/checkpoint-N (two files, as HF Trainer
# leaves several) and run/paused.json; started again, it resumes after the step paused.json names.
FAKE_WORKER = r"""
import shutil, sys, time
from pathlib import Path
from quiver.common.jobs import (CheckpointRecord, EventLog, JobResult, JobSpec, PausedRecord, write_record,
                                PAUSE, PAUSED, RESUMED, STARTED)
workspace, adapter, runs, release = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
JobSpec.model_validate_json((workspace / "spec.json").read_bytes())
events = EventLog(workspace)
paused = workspace / PAUSED
start = PausedRecord.model_validate_json(paused.read_bytes()).step if paused.exists() else 0
if start:
    state = workspace / "run" / "checkpoints" / f"checkpoint-{start}"
    assert (state / "optimizer.pt").read_text() == f"optimizer at {start}", "the resume point did not come along"
events.emit(f"{RESUMED} from step {start}" if start else STARTED)
with open(runs, "a") as out:
    out.write(f"{start}\n")
for step in range(start + 1, 5):
    time.sleep(0.1)
    events.emit(f"Step {step}/4", kind="metrics", data={"step": step, "total_steps": 4, "train_loss": 2.0 / step})
    if step % 2 == 0:
        folder = workspace / "checkpoints" / f"step-{step}"
        shutil.copytree(adapter, folder, dirs_exist_ok=True)
        write_record(folder / "checkpoint.json", CheckpointRecord(step=step, created_at=int(time.time()),
                                                                  metrics={"step": step, "train_loss": 2.0 / step}))
    if step == 2 and not start:
        deadline = time.monotonic() + 60
        while not (workspace / PAUSE).exists() and not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    if (workspace / PAUSE).exists() and step < 4:
        state = workspace / "run" / "checkpoints" / f"checkpoint-{step}"
        state.mkdir(parents=True, exist_ok=True)
        (state / "optimizer.pt").write_text(f"optimizer at {step}")
        (state / "trainer_state.json").write_text("{}")
        write_record(paused, PausedRecord(step=step, checkpoint=state.name))
        events.emit(f"Paused at step {step}: its resumable checkpoint is saved")
        write_record(workspace / "result.json", JobResult(status="paused", step=step))
        sys.exit(0)
shutil.copytree(adapter, workspace / "run", dirs_exist_ok=True)
shutil.rmtree(workspace / "run" / "checkpoints", ignore_errors=True)
paused.unlink(missing_ok=True)
write_record(workspace / "result.json", JobResult(status="succeeded", trained_tokens=7, run_dir=workspace / "run"))
"""


class PausableWorkerLauncher:
    def __init__(self, adapter: Path, runs: Path, release: Path) -> None:
        self.adapter, self.runs, self.release = adapter, runs, release
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(self, workspace: Path) -> LocalRun:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FAKE_WORKER, str(workspace), str(self.adapter), str(self.runs), str(self.release),
            start_new_session=True)
        self.processes.append(process)
        return LocalRun(process)


@pytest.fixture(scope="module")
def s3() -> MotoS3:
    for server in running_s3_server():
        yield server


class Cluster:
    """Gateways sharing one store; `start(name, runner)` adds one (a runner trains with the pausable worker)."""

    def __init__(self, backend: str, s3: MotoS3, model_dir: Path, tmp_path: Path, adapter: Path) -> None:
        self.shared: dict = {}
        if backend == "s3":
            self.shared = {"store_url": f"s3://{s3.new_bucket()}/prod/adapters", "s3_endpoint_url": s3.endpoint_url}
        self.backend, self.model_dir, self.tmp_path, self.adapter = backend, model_dir, tmp_path, adapter
        self.runs = tmp_path / "runs.txt"
        self.runs.touch()
        self.release = tmp_path / "release"
        self.gateways: list[InProcessGateway] = []

    def start(self, name: str, runner: bool) -> InProcessGateway:
        settings = Settings(
            model_cache_dir=self.model_dir.parent, store_dir=self.tmp_path / "store",
            finetuning_dir=self.tmp_path / "finetuning", state_dir=self.tmp_path / name / "state",
            admin_keys=[ADMIN_KEY], api_keys=[API_KEY], store_poll_s=0.2, finetuning_poll_s=0.2,
            finetuning_lease_s=5, finetuning_runner="local" if runner else "off", **self.shared)
        gateway = InProcessGateway(settings, FakeEngine(BASE)).start()
        gateway.state.jobs.launcher = PausableWorkerLauncher(self.adapter, self.runs, self.release)
        self.gateways.append(gateway)
        return gateway

    def stop(self, gateway: InProcessGateway) -> None:
        self.gateways.remove(gateway)
        gateway.stop()


@pytest.fixture(params=["volume", "s3"])
def cluster(request, s3: MotoS3, model_dir: Path, tmp_path: Path, fake_adapter: Path):
    cluster = Cluster(request.param, s3, model_dir, tmp_path, fake_adapter)
    try:
        yield cluster
    finally:
        for gateway in list(cluster.gateways):
            gateway.stop()


def admin(gateway: InProcessGateway) -> openai.OpenAI:
    return gateway.openai(ADMIN_KEY)


def create_job(gateway: InProcessGateway):
    data = b"".join(EXAMPLES.read_bytes().splitlines(keepends=True)[:5])
    client = admin(gateway)
    uploaded = client.files.create(file=("pirate.jsonl", io.BytesIO(data)), purpose="fine-tune")
    return client.fine_tuning.jobs.create(model=BASE, training_file=uploaded.id, suffix="pause")


def wait_for(condition, timeout_s: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def messages(gateway: InProcessGateway, job_id: str) -> list[str]:
    return [e.message for e in admin(gateway).fine_tuning.jobs.list_events(job_id, limit=100).data][::-1]


def test_a_job_paused_on_one_replica_stops_on_its_runner_and_resumes_after_a_restart(cluster: Cluster) -> None:
    runner = cluster.start("a", runner=True)
    api = cluster.start("b", runner=False)  # accepts, pauses and resumes jobs; trains none
    job = create_job(api)
    client = admin(api)
    # The first checkpoint is listed (and served) before the pause.
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, what="the step-2 checkpoint")

    paused = client.fine_tuning.jobs.pause(job.id)  # a record change; the runner is on the other replica
    assert paused.status == "paused"
    jobs = runner.state.jobs
    # The runner sees it, the worker stops at its step boundary, the resume point is kept, the claim let go.
    wait_for(lambda: any(m.startswith("Paused at step 2") for m in messages(api, job.id)), what="the pause")
    wait_for(lambda: jobs.records.read(f"{job.id}/claim.json") is None, what="the claim to go")
    assert jobs._running_job is None
    assert all(p.returncode is not None for p in jobs.launcher.processes)  # no worker process left
    assert jobs.records.read(f"{job.id}/run/paused.json") is not None  # in the shared records (bucket or folder)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [2]
    time.sleep(0.5)  # scans come and go: a paused job is neither run nor failed
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"

    # Every runner goes away; a new one (another workspace) starts: the job is still paused, and resumable.
    cluster.stop(runner)
    cluster.start("c", runner=True)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed")
                    and j, what="the resumed job to finish")
    assert done.status == "succeeded", done.error
    assert cluster.runs.read_text().split() == ["0", "2"]  # the second run started from the pause's step
    events = messages(api, job.id)
    for expected in ("Pausing the job at the next step boundary", "Job resumed", "Fine-tuning job resumed from step 2"):
        assert expected in events, events
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert sorted(steps) == [1, 2, 3, 4]
    name = done.fine_tuned_model
    assert [(c.step_number, c.fine_tuned_model_checkpoint) for c in client.fine_tuning.jobs.checkpoints.list(
        job.id).data] == [(4, f"{name}@2"), (2, f"{name}@1")]
    assert api.state.jobs._resume_keys(job.id) == []  # the resume point goes with the run that used it


def test_cancelling_a_paused_job_drops_its_resume_point_and_checkpoints(cluster: Cluster) -> None:
    gateway = cluster.start("a", runner=True)
    client = admin(gateway)
    job = create_job(gateway)
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, what="the step-2 checkpoint")
    client.fine_tuning.jobs.pause(job.id)
    jobs = gateway.state.jobs
    wait_for(lambda: jobs.records.read(f"{job.id}/claim.json") is None, what="the pause to complete")
    assert jobs._resume_keys(job.id)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert jobs._resume_keys(job.id) == []
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    assert gateway.admin().get("/v1/adapters").json()["data"] == []


def conflict(call) -> tuple[int, str, str | None]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    error = caught.value.body
    return caught.value.status_code, error["code"], error["param"]


@pytest.mark.parametrize("backend", ["volume"])
def test_pause_and_resume_refuse_what_they_cannot_do_with_a_409(backend, s3, model_dir: Path, tmp_path: Path,
                                                                 fake_adapter: Path) -> None:
    cluster = Cluster(backend, s3, model_dir, tmp_path, fake_adapter)
    gateway = cluster.start("a", runner=False)  # nobody trains: jobs stay queued
    try:
        client = admin(gateway)
        jobs = client.fine_tuning.jobs
        queued = create_job(gateway)
        assert conflict(lambda: jobs.pause(queued.id)) == (409, "job_not_running", "fine_tuning_job_id")
        assert conflict(lambda: jobs.resume(queued.id)) == (409, "job_not_paused", "fine_tuning_job_id")
        # Running (on some runner): a second pause, or a resume before the pause, are refused.
        service = gateway.state.jobs
        service._update(service.get(queued.id), status="running")
        assert conflict(lambda: jobs.resume(queued.id)) == (409, "job_not_paused", "fine_tuning_job_id")
        assert jobs.pause(queued.id).status == "paused"
        assert conflict(lambda: jobs.pause(queued.id)) == (409, "job_not_running", "fine_tuning_job_id")
        jobs.cancel(queued.id)
        assert conflict(lambda: jobs.pause(queued.id)) == (409, "job_finished", "fine_tuning_job_id")
        assert conflict(lambda: jobs.resume(queued.id)) == (409, "job_finished", "fine_tuning_job_id")
        missing = "ftjob-" + "0" * 24
        assert conflict(lambda: jobs.pause(missing))[:2] == (404, "job_not_found")
        assert conflict(lambda: jobs.resume(missing))[:2] == (404, "job_not_found")
        # An id of no shape of ours is a 404 too, never a path.
        assert conflict(lambda: jobs.pause("../../etc"))[0] == 404
    finally:
        cluster.stop(gateway)

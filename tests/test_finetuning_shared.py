"""Fine-tuning across replicas: two gateways (in process, on the fake engine) sharing one store, either one
folder (a ReadWriteMany volume) or one bucket of a real S3 server process (moto's, tests/s3_server.py). Both
see the same files and jobs; a queued job is claimed by exactly one runner; a cancel on one replica stops the
worker on the other; the adapter a job trains is registered through the store and served by both.

The training worker is played by a small process that follows the worker's file protocol (reads spec.json,
writes events.jsonl, places an adapter in run/, writes result.json last): the trainer itself is tested in the
`training` group; here what matters is where the records live and who runs what.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from quiver.fake_engine import FakeEngine, fake_text
from quiver.finetuning.launcher import LocalRun
from quiver.settings import Settings
from quiver.testing import ADMIN_KEY, API_KEY, InProcessGateway
from s3_fixtures import MotoS3, running_s3_server

BASE = "SmolLM2-135M-Instruct"
EXAMPLES = Path(__file__).parent.parent / "examples" / "pirate.jsonl"
PREFIX = "prod/adapters"

# The worker's side of the protocol (quiver.training.worker), without the training: argv = workspace, the
# adapter to hand in, a file to count runs in, seconds to "train".
FAKE_WORKER = r"""
import shutil, sys, time
from pathlib import Path
from quiver.common.jobs import CheckpointRecord, EventLog, JobResult, JobSpec, write_record
workspace, adapter, runs, seconds = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
spec = JobSpec.model_validate_json((workspace / "spec.json").read_bytes())
assert spec.training_file.is_file(), spec.training_file
with open(runs, "a") as count:
    count.write(spec.name + "\n")
events = EventLog(workspace)
events.emit("Fine-tuning job started")
time.sleep(seconds)
events.emit("Step 1/1", kind="metrics", data={"step": 1, "total_steps": 1, "train_loss": 1.5})
shutil.copytree(adapter, workspace / "checkpoints" / "step-1")  # the epoch's checkpoint, as EpochCheckpoints
write_record(workspace / "checkpoints" / "step-1" / "checkpoint.json",
             CheckpointRecord(step=1, created_at=int(time.time()), metrics={"step": 1.0, "train_loss": 1.5}))
shutil.copytree(adapter, workspace / "run")
(workspace / "run" / "manifest.json").write_text('{"name": "%s"}' % spec.name)
write_record(workspace / "result.json", JobResult(status="succeeded", trained_tokens=7, run_dir=workspace / "run"))
"""


class FakeWorkerLauncher:
    def __init__(self, adapter: Path, runs: Path, seconds: float = 0.0) -> None:
        self.adapter, self.runs, self.seconds = adapter, runs, seconds

    async def start(self, workspace: Path) -> LocalRun:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FAKE_WORKER, str(workspace), str(self.adapter), str(self.runs), str(self.seconds),
            start_new_session=True)
        return LocalRun(process)


@pytest.fixture(scope="module")
def s3() -> MotoS3:
    for server in running_s3_server():  # this module's own: the outage test kills it
        yield server


@pytest.fixture(params=["volume", "s3"])
def replicas(request, s3, model_dir: Path, tmp_path: Path, fake_adapter: Path):
    """Two gateways sharing one store; each runner hands its jobs to the fake worker."""
    shared: dict = {}
    if request.param == "s3":
        bucket = s3.new_bucket()
        shared = {"store_url": f"s3://{bucket}/{PREFIX}", "s3_endpoint_url": s3.endpoint_url}
    runs = tmp_path / "runs.txt"
    runs.touch()
    started = []
    for name in ("a", "b"):
        settings = Settings(
            model_cache_dir=model_dir.parent, store_dir=tmp_path / "store", finetuning_dir=tmp_path / "finetuning",
            state_dir=tmp_path / name / "state", admin_keys=[ADMIN_KEY], api_keys=[API_KEY], store_poll_s=0.2,
            finetuning_poll_s=0.2, finetuning_lease_s=5, **shared)
        gateway = InProcessGateway(settings, FakeEngine(BASE)).start()
        gateway.state.jobs.launcher = FakeWorkerLauncher(fake_adapter, runs, seconds=0.5)
        started.append(gateway)
    try:
        yield started[0], started[1], runs, request.param
    finally:
        for gateway in started:
            gateway.stop()


def admin(gateway: InProcessGateway) -> openai.OpenAI:
    return gateway.openai(ADMIN_KEY)


def upload(gateway: InProcessGateway, lines: int = 5):
    data = b"".join(EXAMPLES.read_bytes().splitlines(keepends=True)[:lines])
    return admin(gateway).files.create(file=("pirate.jsonl", io.BytesIO(data)), purpose="fine-tune"), data


def wait_for(condition, timeout_s: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def test_files_uploaded_on_one_replica_are_read_and_deleted_on_the_other(replicas, s3: MotoS3) -> None:
    a, b, _, backend = replicas
    uploaded, data = upload(a)
    assert [f.id for f in admin(b).files.list().data] == [uploaded.id]
    assert admin(b).files.retrieve(uploaded.id) == uploaded
    assert admin(b).files.content(uploaded.id).read() == data
    if backend == "s3":  # in the bucket, beside the adapters, and nowhere on the replicas' disks but scratch
        bucket = a.settings.store_url.split("/")[2]
        assert f"{PREFIX}.finetuning/files/{uploaded.id}.jsonl" in s3.keys(bucket)
        assert not (a.settings.finetuning_dir).exists()
    admin(b).files.delete(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        admin(a).files.retrieve(uploaded.id)


def test_a_job_accepted_on_one_replica_runs_once_and_both_serve_its_adapter(replicas) -> None:
    a, b, runs, _ = replicas
    uploaded, _ = upload(a)
    job = admin(a).fine_tuning.jobs.create(model=BASE, training_file=uploaded.id, suffix="shared")
    assert admin(b).fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")
    done = wait_for(lambda: (j := admin(b).fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
                    what="the job to finish")
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and done.trained_tokens == 7
    assert runs.read_text().splitlines() == [done.fine_tuned_model]  # one runner took it, once
    messages = [e.message for e in admin(b).fine_tuning.jobs.list_events(job.id).data][::-1]
    assert messages[:2] == ["Validating training file", "Job queued"]
    assert "Fine-tuning job started" in messages and "Step 1/1" in messages  # the worker's, whichever ran it
    assert messages[-1].startswith(f"New fine-tuned model created: {done.fine_tuned_model}")
    # The run's manifest (the console's view) from either replica, wherever the training ran.
    for gateway in (a, b):
        manifest = gateway.admin().get(f"/v1/fine_tuning/jobs/{job.id}/manifest")
        assert manifest.status_code == 200 and manifest.json() == {"name": done.fine_tuned_model}, manifest.text
    # The epoch checkpoint (registered by the runner, its record published) and the results file, from either.
    for gateway in (a, b):
        checkpoints = admin(gateway).fine_tuning.jobs.checkpoints.list(job.id).data
        assert [(c.step_number, c.fine_tuned_model_checkpoint, c.metrics.train_loss) for c in checkpoints] == \
            [(1, f"{done.fine_tuned_model}@1", 1.5)]
        assert len(done.result_files) == 1
        csv_text = admin(gateway).files.content(done.result_files[0]).read().decode()
        assert csv_text.splitlines()[0].startswith("step,train_loss") and csv_text.splitlines()[1].startswith("1,1.5")
    # Registered through the store: both replicas serve it (the other at its next store poll).
    for gateway in (a, b):
        answer = wait_for(lambda g=gateway: _chat(g, done.fine_tuned_model), what="the adapter to be served")
        assert answer == fake_text(f"{done.fine_tuned_model}@1", 3)


def _chat(gateway: InProcessGateway, model: str) -> str | None:
    try:
        reply = gateway.openai().chat.completions.create(model=model, max_tokens=3,
                                                          messages=[{"role": "user", "content": "Hi"}])
    except openai.NotFoundError:
        return None
    return reply.choices[0].message.content


def test_a_cancel_on_one_replica_stops_the_worker_running_on_the_other(replicas) -> None:
    a, b, runs, _ = replicas
    for gateway in (a, b):
        gateway.state.jobs.launcher.seconds = 60  # long enough to be cancelled while it runs
    uploaded, _ = upload(a)
    job = admin(a).fine_tuning.jobs.create(model=BASE, training_file=uploaded.id)
    wait_for(lambda: admin(a).fine_tuning.jobs.retrieve(job.id).status == "running", what="the job to run")
    wait_for(lambda: runs.read_text(), what="the worker to start")
    runner = a if a.state.jobs._running_job == job.id else b
    other = b if runner is a else a
    assert runner.state.jobs._running_job == job.id and other.state.jobs._running_job is None
    assert admin(other).fine_tuning.jobs.cancel(job.id).status == "cancelled"
    # The runner notices at its next heartbeat (every lease/4 s), kills its worker, registers nothing.
    wait_for(lambda: runner.state.jobs._running_job is None, timeout_s=20, what="the worker to be stopped")
    final = admin(runner).fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    assert admin(runner).models.list().data and all(m.id == BASE for m in admin(runner).models.list().data)


def test_two_runners_racing_for_the_same_jobs_take_each_exactly_once(s3: MotoS3, tmp_path: Path) -> None:
    """The claim is a conditional create: against the real S3 server, of runners racing for every job, one wins."""
    from quiver.finetuning.records import S3Records
    from quiver.finetuning.service import JobService, _new_id
    from quiver.adapters.s3_store import s3_client

    bucket = s3.new_bucket()
    services = [JobService(S3Records(s3_client(s3.endpoint_url, None), bucket, "race.finetuning/jobs",
                                     tmp_path / f"scratch-{n}"), None, None, tmp_path)  # type: ignore[arg-type]
                for n in range(4)]
    job_ids = [_new_id("ftjob") for _ in range(10)]
    won: dict[str, list[int]] = {job_id: [] for job_id in job_ids}
    barrier = threading.Barrier(len(services))

    def race(n: int) -> None:
        barrier.wait()
        for job_id in job_ids:
            if services[n]._claim(job_id):
                won[job_id].append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(len(services))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(len(winners) == 1 for winners in won.values()), won
    # A live claim is not taken over; a stale one (no heartbeat for the lease) is, by exactly one runner.
    first = job_ids[0]
    holder = services[won[first][0]]
    holder._running_job = first  # it is running the job
    assert not any(s._claim(first) for s in services if s is not holder)
    claim_key = f"race.finetuning/jobs/{first}/claim.json"
    stale = json.dumps({"owner": "gone-host:1:x", "at": time.time() - 3600}).encode()
    s3.client.put_object(Bucket=bucket, Key=claim_key, Body=stale)
    assert [s._claim(first) for s in services].count(True) == 1


def test_a_server_that_does_not_train_queues_and_a_runner_gone_away_fails_its_job(model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    from quiver.finetuning.records import LocalRecords
    from quiver.finetuning.service import FileService, JobService

    settings = Settings(model_cache_dir=model_dir.parent, store_dir=tmp_path / "store", state_dir=tmp_path / "state",
                        finetuning_dir=tmp_path / "finetuning", admin_keys=[ADMIN_KEY], api_keys=[API_KEY],
                        store_poll_s=0, finetuning_runner="off")
    gateway = InProcessGateway(settings, FakeEngine(BASE)).start()
    try:
        uploaded, _ = upload(gateway)
        job = admin(gateway).fine_tuning.jobs.create(model=BASE, training_file=uploaded.id)
        time.sleep(0.5)
        assert admin(gateway).fine_tuning.jobs.retrieve(job.id).status == "queued"  # nobody here trains
        # A runner elsewhere claimed it, marked it running, and stopped renewing its claim.
        jobs = gateway.state.jobs
        jobs._update(jobs.get(job.id), status="running")
        jobs.records.write(f"{job.id}/claim.json",
                           json.dumps({"owner": "elsewhere:7:abc", "at": time.time() - 120}).encode())
        records = LocalRecords(tmp_path / "finetuning")
        other = JobService(records.child("jobs"), FileService(records.child("files"), 1 << 20), None,  # type: ignore[arg-type]
                           tmp_path, lease_s=60)
        assert other.scan() == []
        failed = admin(gateway).fine_tuning.jobs.retrieve(job.id)
        assert failed.status == "failed" and failed.error.code == "interrupted"
        # A fresh claim of a live runner is left alone.
        second = admin(gateway).fine_tuning.jobs.create(model=BASE, training_file=uploaded.id)
        jobs._update(jobs.get(second.id), status="running")
        jobs.records.write(f"{second.id}/claim.json",
                           json.dumps({"owner": "elsewhere:7:abc", "at": time.time()}).encode())
        assert other.scan() == [] and admin(gateway).fine_tuning.jobs.retrieve(second.id).status == "running"
    finally:
        gateway.stop()


def test_the_bucket_away_is_a_503_and_files_come_back_with_it(s3: MotoS3, model_dir: Path, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    settings = Settings(model_cache_dir=model_dir.parent, store_dir=tmp_path / "store", state_dir=tmp_path / "state",
                        admin_keys=[ADMIN_KEY], api_keys=[API_KEY], store_poll_s=0, finetuning_poll_s=0,
                        store_url=f"s3://{bucket}/{PREFIX}", s3_endpoint_url=s3.endpoint_url)
    gateway = InProcessGateway(settings, FakeEngine(BASE)).start()
    try:
        uploaded, _ = upload(gateway)
        saved = s3.snapshot(bucket)
        s3.stop()
        try:
            for call in (lambda: admin(gateway).files.list(), lambda: admin(gateway).files.retrieve(uploaded.id),
                         lambda: admin(gateway).fine_tuning.jobs.list()):
                with pytest.raises(openai.APIStatusError) as away:
                    call()
                assert away.value.status_code == 503, away.value
                assert away.value.body["type"] and "not reachable" in away.value.body["message"]
        finally:
            s3.start()
            s3.restore(bucket, saved)
        assert admin(gateway).files.retrieve(uploaded.id) == uploaded
    finally:
        gateway.stop()


@pytest.mark.training
def test_quiver_worker_processes_train_off_the_serving_replica_and_it_serves_the_adapter(
        s3: MotoS3, model_dir: Path, tmp_path: Path) -> None:
    """The cluster's shape: a serving replica that only accepts jobs (QUIVER_FINETUNING_RUNNER=off) and two
    `quiver worker` processes sharing its bucket. One of them claims the job, really trains it, and registers
    the adapter into the store; the serving replica serves it after its next store poll."""
    import os
    import subprocess

    from s3_fixtures import S3_ENV

    bucket = s3.new_bucket()
    shared = {"store_url": f"s3://{bucket}/{PREFIX}", "s3_endpoint_url": s3.endpoint_url}
    settings = Settings(model_cache_dir=model_dir.parent, store_dir=tmp_path / "store", state_dir=tmp_path / "serving",
                        admin_keys=[ADMIN_KEY], api_keys=[API_KEY], store_poll_s=0.2, finetuning_runner="off",
                        **shared)
    gateway = InProcessGateway(settings, FakeEngine(BASE)).start()
    quiver = Path(sys.executable).with_name("quiver")
    workers = []
    try:
        for name in ("worker-1", "worker-2"):
            env = {**os.environ, **S3_ENV, "HF_HUB_OFFLINE": "1", "QUIVER_STORE_URL": shared["store_url"],
                   "QUIVER_S3_ENDPOINT_URL": s3.endpoint_url, "QUIVER_MODEL_CACHE_DIR": str(model_dir.parent),
                   "QUIVER_STATE_DIR": str(tmp_path / name), "QUIVER_FINETUNING_POLL_S": "0.5",
                   "QUIVER_STORE_POLL_S": "1"}
            log_file = open(tmp_path / f"{name}.log", "wb")
            workers.append((subprocess.Popen([str(quiver), "worker"], env=env, stdout=log_file,
                                             stderr=subprocess.STDOUT, start_new_session=True), log_file))
        uploaded, _ = upload(gateway, lines=6)
        job = admin(gateway).fine_tuning.jobs.create(model=BASE, training_file=uploaded.id, suffix="worker",
                                                     hyperparameters={"n_epochs": 1})
        done = wait_for(lambda: (j := admin(gateway).fine_tuning.jobs.retrieve(job.id)).status in (
            "succeeded", "failed", "cancelled") and j, timeout_s=600, what="a worker to train the job")
        logs = "\n".join((tmp_path / f"{n}.log").read_text(errors="replace")[-2000:] for n in ("worker-1", "worker-2"))
        assert done.status == "succeeded", f"{done.error}\n{logs}"
        messages = [e.message for e in admin(gateway).fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert messages.count("Fine-tuning job started") == 1  # one worker trained it
        assert any(m.startswith("Step ") for m in messages)  # the worker's metrics reached the shared log
        answer = wait_for(lambda: _chat(gateway, done.fine_tuned_model), what="the serving replica to serve it")
        assert answer == fake_text(f"{done.fine_tuned_model}@1", 3)
        for name in ("worker-1", "worker-2"):  # the training scratch copy is gone; the records stay in the bucket
            assert not (tmp_path / name / "finetuning-scratch" / "jobs" / "workspaces" / job.id).exists()
        assert f"{PREFIX}.finetuning/jobs/{job.id}/train.log" in s3.keys(bucket)
    finally:
        for process, log_file in workers:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log_file.close()
        gateway.stop()

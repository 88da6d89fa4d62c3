"""OpenAI fine-tuning API parity with the official client: the job's `method`, `result_files`,
`estimated_finish`, events paging, checkpoints served as `name@N`, continued training, DPO's hyperparameters.

The fast tests run the gateway in process on the fake engine with a stand-in worker (a script that writes what
`quiver.training.worker` writes: events, checkpoints, the run folder, result.json); the last test runs a short
real job on the real engine and trainer.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

import openai
import pytest

from quiver.common.jobs import SPEC, JobSpec
from quiver.testing import ADMIN_KEY, API_KEY, InProcessGateway

BASE = "SmolLM2-135M-Instruct"
EXAMPLES = Path(__file__).parent.parent / "examples" / "pirate.jsonl"
JOB_TIMEOUT_S = 900

# What quiver.training.worker leaves in a job folder, without training: two epochs of two steps, a checkpoint
# at the end of each (copies of the adapters the plan names), the final adapter, then result.json. Step events
# carry made-up timestamps 2 s apart, so the estimate of the finish is known exactly; with `hold`, the worker
# waits for that file before it finishes (the job stays running meanwhile).
FAKE_WORKER = r'''
import json, shutil, sys, time
from pathlib import Path
from quiver.common.jobs import (CHECKPOINT, CHECKPOINTS, EVENTS, RESULT, CheckpointRecord, EventLog,
                                JobEventRecord, JobResult, ResolvedHyperparameters, write_record)

plan = json.loads(Path(sys.argv[1]).read_text())
job_dir = Path(sys.argv[2])
events = EventLog(job_dir)
events.emit("Fine-tuning job started")
start = int(time.time()) - 100
for step in (1, 2, 3, 4):
    logged = [{"train_loss": 2.0 / step, "learning_rate": 0.001 * (4 - step)}]
    if step % 2 == 0:
        logged.append({"valid_loss": 1.5 / step, "full_valid_loss": 1.5 / step})
    for data in logged:
        with open(job_dir / EVENTS, "a") as out:
            out.write(JobEventRecord(created_at=start + 2 * step, message=f"Step {step}/4", type="metrics",
                                     data={"step": step, "total_steps": 4, **data}).model_dump_json() + "\n")
    if step % 2 == 0:
        folder = job_dir / CHECKPOINTS / f"step-{step}"
        shutil.copytree(plan["checkpoints"][step // 2 - 1], folder)
        write_record(folder / CHECKPOINT, CheckpointRecord(step=step, created_at=int(time.time()), metrics={
            "step": step, "train_loss": 2.0 / step, "valid_loss": 1.5 / step, "full_valid_loss": 1.5 / step}))
    if step == 4 and plan.get("redo_first"):  # as a run that started over, or rotates its own checkpoints
        shutil.rmtree(job_dir / CHECKPOINTS / "step-2")
        shutil.copytree(plan["checkpoints"][0], job_dir / CHECKPOINTS / "step-2")
        write_record(job_dir / CHECKPOINTS / "step-2" / CHECKPOINT,
                     CheckpointRecord(step=2, created_at=int(time.time()), metrics={"step": 2}))
    if step == 2 and plan.get("hold"):
        deadline = time.monotonic() + 60
        while not Path(plan["hold"]).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
shutil.copytree(plan["final"], job_dir / "run")
write_record(job_dir / RESULT, JobResult(status="succeeded", trained_tokens=1234, run_dir=job_dir / "run",
                                         hyperparameters=ResolvedHyperparameters(**plan["resolved"])))
'''


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from quiver.testing import random_adapter

    root = tmp_path_factory.mktemp("ft-api-adapters")
    return {name: random_adapter(model_dir, root / name, seed=seed) for name, seed in (("a", 11), ("b", 12),
                                                                                    ("c", 13))}


@pytest.fixture
def gateway(model_dir: Path, tmp_path: Path, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    from quiver.fake_engine import FakeEngine
    from quiver.finetuning.launcher import LocalLauncher
    from quiver.settings import Settings

    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    plan_path = tmp_path / "plan.json"
    plan = {"checkpoints": [str(adapters["a"]), str(adapters["b"])], "final": str(adapters["b"]),
            "resolved": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}}
    plan_path.write_text(json.dumps(plan))
    monkeypatch.setattr(LocalLauncher, "command",
                        lambda self, job_dir: [sys.executable, str(script), str(plan_path), str(job_dir)])
    settings = Settings(model_cache_dir=model_dir.parent, store_dir=tmp_path / "store", state_dir=tmp_path / "state",
                        finetuning_dir=tmp_path / "ft", admin_keys=[ADMIN_KEY], api_keys=[API_KEY], store_poll_s=0)
    server = InProcessGateway(settings, FakeEngine(BASE)).start()
    server.plan = plan  # type: ignore[attr-defined]
    server.set_plan = lambda **changes: plan_path.write_text(json.dumps({**plan, **changes}))  # type: ignore
    try:
        yield server
    finally:
        server.stop()


def admin(server) -> openai.OpenAI:
    return server.openai(key=server.admin_key)


def upload(client: openai.OpenAI, lines: int = 12) -> str:
    content = b"".join(EXAMPLES.read_bytes().splitlines(keepends=True)[:lines])
    return client.files.create(file=("pirate.jsonl", io.BytesIO(content)), purpose="fine-tune").id


def upload_preference(client: openai.OpenAI, lines: int = 12) -> str:
    """Preference pairs made from the chat examples: their answer preferred to a curt one."""
    pairs = []
    for raw in EXAMPLES.read_bytes().splitlines()[:lines]:
        messages = json.loads(raw)["messages"]
        pairs.append({"input": {"messages": messages[:-1]}, "preferred_output": [messages[-1]],
                      "non_preferred_output": [{"role": "assistant", "content": "No."}]})
    content = "".join(json.dumps(pair) + "\n" for pair in pairs).encode()
    return client.files.create(file=("pairs.jsonl", io.BytesIO(content)), purpose="fine-tune").id


def wait_finished(client: openai.OpenAI, job_id: str):
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.1)


def job_spec(server, job_id: str) -> JobSpec:
    return JobSpec.model_validate_json((server.settings.finetuning_dir / "jobs" / job_id / SPEC).read_bytes())


def test_each_epoch_checkpoint_is_a_staged_version_served_as_name_at_n(gateway) -> None:
    client = admin(gateway)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client), suffix="ckpt")
    job = wait_finished(client, job.id)
    assert job.status == "succeeded", job.error
    name = job.fine_tuned_model

    page = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert [(c.step_number, c.fine_tuned_model_checkpoint) for c in page.data] == [(4, f"{name}@2"), (2, f"{name}@1")]
    latest, first = page.data
    assert latest.object == "fine_tuning.job.checkpoint" and latest.fine_tuning_job_id == job.id
    assert latest.metrics.step == 4 and latest.metrics.train_loss == 0.5 and latest.metrics.valid_loss == 0.375
    assert first.metrics.full_valid_loss == 0.75
    # OpenAI's paging: `after` a checkpoint id, `limit`.
    one = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)
    assert [c.id for c in one.data] == [latest.id] and one.has_more
    rest = client.fine_tuning.jobs.checkpoints.list(job.id, after=latest.id, limit=5)
    assert [c.id for c in rest.data] == [first.id] and not rest.has_more

    # The final adapter is the last epoch's: that version is promoted, not registered again.
    versions = gateway.admin().get(f"/v1/adapters/{name}").json()
    assert [(v["version"], v["current"]) for v in versions["versions"]] == [(1, False), (2, True)]
    # Every checkpoint answers by name@N; the bare name serves the final version.
    inference = gateway.openai()
    for model, served in ((f"{name}@1", f"{name}@1"), (name, f"{name}@2")):
        answer = inference.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2)
        assert gateway.engine.requests[-1]["model"] == served, answer


def held_at_first_checkpoint(gateway, tmp_path: Path, **plan):
    """A job whose worker holds after its first epoch's checkpoint (step 2) until `release` is touched; returns
    the client, the job and the listed checkpoint once the listing shows it (while the job runs)."""
    release = tmp_path / "release"
    gateway.set_plan(hold=str(release), **plan)
    client = admin(gateway)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client), suffix="live")
    deadline = time.monotonic() + 60
    while not (listed := client.fine_tuning.jobs.checkpoints.list(job.id).data):
        assert time.monotonic() < deadline, "the first checkpoint was never listed"
        time.sleep(0.05)
    return client, client.fine_tuning.jobs.retrieve(job.id), listed, release


def test_a_checkpoint_is_listed_and_served_while_the_job_still_runs(gateway, tmp_path: Path) -> None:
    client, job, listed, release = held_at_first_checkpoint(gateway, tmp_path)
    assert job.status == "running"
    name = f"live-{job.id.removeprefix('ftjob-')[:8]}"
    [first] = listed
    assert (first.step_number, first.fine_tuned_model_checkpoint) == (2, f"{name}@1")
    assert first.metrics.train_loss == 1.0 and first.metrics.valid_loss == 0.75
    inference = gateway.openai()
    inference.chat.completions.create(model=f"{name}@1", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert gateway.engine.requests[-1]["model"] == f"{name}@1"
    # Staged: the bare name serves nothing until the job commits.
    with pytest.raises(openai.NotFoundError):
        inference.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert any(e.message == f"Checkpoint at step 2 is served as {name}@1"
               for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data)

    release.touch()
    job = wait_finished(client, job.id)
    assert job.status == "succeeded", job.error
    # Registered once each; the final adapter (the last checkpoint's weights) promoted, not registered again.
    assert [(c.step_number, c.fine_tuned_model_checkpoint) for c in client.fine_tuning.jobs.checkpoints.list(job.id)
            .data] == [(4, f"{name}@2"), (2, f"{name}@1")]
    versions = gateway.admin().get(f"/v1/adapters/{name}").json()["versions"]
    assert [(v["version"], v["current"]) for v in versions] == [(1, False), (2, True)]


def test_the_worker_redoing_its_checkpoint_folders_leaves_the_listing_alone(gateway, tmp_path: Path) -> None:
    """With a folder store the worker's workspace is the job's record folder: the runner's listing lives apart
    from the worker's `checkpoints/`, so a worker that starts over or rotates them neither unlists a registered
    checkpoint (whose staged version would then leak) nor gets it registered twice."""
    client, job, listed, release = held_at_first_checkpoint(gateway, tmp_path, redo_first=True)
    release.touch()  # registered and listed; now the worker redoes step-2
    job = wait_finished(client, job.id)
    assert job.status == "succeeded", job.error
    name = job.fine_tuned_model
    assert [(c.step_number, c.fine_tuned_model_checkpoint) for c in client.fine_tuning.jobs.checkpoints.list(job.id)
            .data] == [(4, f"{name}@2"), (2, f"{name}@1")]
    versions = gateway.admin().get(f"/v1/adapters/{name}").json()["versions"]
    assert [(v["version"], v["current"]) for v in versions] == [(1, False), (2, True)]


def test_a_cancelled_job_takes_its_checkpoints_with_it(gateway, tmp_path: Path) -> None:
    client, job, listed, release = held_at_first_checkpoint(gateway, tmp_path)
    version = listed[0].fine_tuned_model_checkpoint
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    release.touch()
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    assert gateway.admin().get("/v1/adapters").json()["data"] == []
    with pytest.raises(openai.NotFoundError):
        gateway.openai().chat.completions.create(model=version, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2)


def test_a_checkpoint_made_current_while_the_job_ran_outlives_its_cancel(gateway, tmp_path: Path) -> None:
    client, job, listed, release = held_at_first_checkpoint(gateway, tmp_path)
    name, _, version = listed[0].fine_tuned_model_checkpoint.partition("@")
    assert gateway.admin().post(f"/v1/adapters/{name}/promote", json={"version": int(version)}).status_code == 200
    client.fine_tuning.jobs.cancel(job.id)
    release.touch()
    assert [c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [
        f"{name}@{version}"]
    versions = gateway.admin().get(f"/v1/adapters/{name}").json()["versions"]
    assert [(v["version"], v["current"]) for v in versions] == [(int(version), True)]


def test_a_final_adapter_unlike_any_checkpoint_is_a_new_current_version(gateway, adapters) -> None:
    gateway.set_plan(final=str(adapters["c"]))
    client = admin(gateway)
    job = wait_finished(client, client.fine_tuning.jobs.create(model=BASE, training_file=upload(client)).id)
    assert job.status == "succeeded", job.error
    versions = gateway.admin().get(f"/v1/adapters/{job.fine_tuned_model}").json()["versions"]
    assert [(v["version"], v["current"]) for v in versions] == [(1, False), (2, False), (3, True)]


def test_result_files_are_a_downloadable_metrics_csv(gateway) -> None:
    client = admin(gateway)
    job = wait_finished(client, client.fine_tuning.jobs.create(model=BASE, training_file=upload(client)).id)
    assert job.status == "succeeded" and len(job.result_files) == 1
    record = client.files.retrieve(job.result_files[0])
    assert record.purpose == "fine-tune-results" and record.filename == f"{job.id}-results.csv"
    content = client.files.content(job.result_files[0])
    assert content.response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(content.text)))
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"]
    assert rows[0]["train_loss"] == "2.0" and rows[0]["valid_loss"] == "" and rows[0]["learning_rate"] == "0.003"
    assert rows[1]["valid_loss"] == "0.75" and rows[3]["train_loss"] == "0.5"
    assert record.bytes == len(content.content)
    # Results are not training data.
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=BASE, training_file=record.id)
    assert refused.value.code == "invalid_file_purpose"


def test_the_job_carries_its_method_and_the_hyperparameters_auto_became(gateway) -> None:
    client = admin(gateway)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client), seed=5,
                                         hyperparameters={"batch_size": 4})
    assert job.method.type == "supervised" and job.seed == 5 and job.integrations is None
    assert job.method.supervised.hyperparameters.batch_size == 4
    assert job.method.supervised.hyperparameters.n_epochs == "auto"
    done = wait_finished(client, job.id)
    used = done.method.supervised.hyperparameters
    assert (used.n_epochs, used.batch_size, used.learning_rate_multiplier) == (2, 4, 1.0)
    assert (done.hyperparameters.n_epochs, done.hyperparameters.batch_size) == (2, 4)
    assert done.trained_tokens == 1234 and done.estimated_finish is None


def test_a_running_job_estimates_its_finish_from_the_measured_step_time(gateway, tmp_path: Path) -> None:
    hold = tmp_path / "release"
    gateway.set_plan(hold=str(hold))
    client = admin(gateway)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client))
    deadline = time.monotonic() + 60
    while (job := client.fine_tuning.jobs.retrieve(job.id)).estimated_finish is None:
        assert time.monotonic() < deadline and job.status in ("validating_files", "queued", "running")
        time.sleep(0.05)
    steps = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    first, last = min(e.created_at for e in steps), max(e.created_at for e in steps)
    assert job.status == "running"
    # Steps 1 and 2 logged 2 s apart: 2 steps left at 2 s each.
    assert job.estimated_finish == last + 4 and last - first == 2
    assert client.fine_tuning.jobs.list().data[0].estimated_finish == job.estimated_finish
    hold.touch()
    assert wait_finished(client, job.id).estimated_finish is None


def test_events_page_newest_first_with_after_and_limit(gateway) -> None:
    client = admin(gateway)
    job = wait_finished(client, client.fine_tuning.jobs.create(model=BASE, training_file=upload(client)).id)
    everything = client.fine_tuning.jobs.list_events(job.id, limit=1000)
    assert not everything.has_more and len(everything.data) > 6
    assert everything.data[0].message.startswith("New fine-tuned model created")
    assert everything.data[-1].message == "Validating training file"
    pages, after = [], None
    while True:
        page = client.fine_tuning.jobs.list_events(job.id, after=after, limit=3) if after else \
            client.fine_tuning.jobs.list_events(job.id, limit=3)
        pages.extend(page.data)
        assert len(page.data) <= 3
        if not page.has_more:
            break
        after = page.data[-1].id
    assert [e.id for e in pages] == [e.id for e in everything.data]
    # The official client's auto-paging walks the same cursor.
    assert [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=2)] == [e.id for e in everything.data]
    assert client.fine_tuning.jobs.list_events(job.id, after="ftevent-unknown").data == []


def test_continued_training_starts_from_the_version_and_adds_versions_to_its_name(gateway, adapters) -> None:
    assert gateway.register("mine", adapters["c"]).status_code == 201
    client = admin(gateway)
    training_file = upload(client)
    job = client.fine_tuning.jobs.create(model="mine", training_file=training_file)
    assert job.model == "mine@1"  # pinned to the version current when the job was created
    done = wait_finished(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "mine"
    spec = job_spec(gateway, job.id)
    assert spec.init_adapter is not None and spec.init_adapter.parent.name == job.id
    assert (spec.init_adapter / "adapter_model.safetensors").read_bytes() == \
        (adapters["c"] / "adapter_model.safetensors").read_bytes()
    versions = gateway.admin().get("/v1/adapters/mine").json()
    assert versions["current_version"] == 3 and len(versions["versions"]) == 3
    assert [c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == \
        ["mine@3", "mine@2"]

    # From a pinned version, with a suffix: a new name.
    other = wait_finished(client, client.fine_tuning.jobs.create(model="mine@2", training_file=training_file,
                                                                 suffix="fork").id)
    assert other.model == "mine@2" and other.fine_tuned_model.startswith("fork-")
    assert (job_spec(gateway, other.id).init_adapter / "adapter_model.safetensors").read_bytes() == \
        (adapters["a"] / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("model", ["nothing-here", "mine@7", "mine@0", "x" * 500, "../mine"])
def test_a_model_that_is_neither_the_base_nor_a_registered_adapter_is_a_400(gateway, adapters, model) -> None:
    assert gateway.register("mine", adapters["c"]).status_code == 201
    client = admin(gateway)
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=model, training_file=upload(client))
    assert refused.value.code == "model_not_available" and refused.value.param == "model"
    assert len(refused.value.message) < 400
    assert client.fine_tuning.jobs.list().data == []


def test_a_dpo_job_carries_openai_s_hyperparameters_to_the_worker(gateway) -> None:
    client = admin(gateway)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload_preference(client), method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "batch_size": 2}}})
    assert job.method.type == "dpo" and job.method.supervised is None
    assert job.method.dpo.hyperparameters.beta == 0.25 and job.method.dpo.hyperparameters.n_epochs == 2
    wait_finished(client, job.id)
    spec = job_spec(gateway, job.id)
    assert (spec.method, spec.beta, spec.hyperparameters.n_epochs, spec.hyperparameters.batch_size) == \
        ("dpo", 0.25, 2, 2)
    # `auto` beta leaves the trainer's default.
    auto = client.fine_tuning.jobs.create(model=BASE, training_file=upload_preference(client), method={"type": "dpo"})
    assert auto.method.dpo.hyperparameters.beta == "auto"
    wait_finished(client, auto.id)
    assert job_spec(gateway, auto.id).beta is None and job_spec(gateway, auto.id).method == "dpo"


def test_a_job_refuses_a_training_file_of_the_other_method_s_format(gateway) -> None:
    """Preference data is accepted as a file, trains a dpo job only; chat data trains a supervised job only."""
    client = admin(gateway)
    pairs, chat = upload_preference(client), upload(client)
    for method, file_id in (({"type": "dpo"}, chat), ({"type": "supervised"}, pairs), (None, pairs)):
        extra = {"method": method} if method else {}
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(model=BASE, training_file=file_id, **extra)
        assert refused.value.code == "invalid_training_file_format" and refused.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=BASE, training_file=pairs, validation_file=chat, method={"type": "dpo"})
    assert refused.value.param == "validation_file"
    assert client.fine_tuning.jobs.list().data == []


@pytest.mark.parametrize("beta", [0, -0.1, 2.5, "0.1", True, "many", float("inf")])
def test_dpo_beta_out_of_bounds_or_of_the_wrong_type_is_a_400(gateway, beta) -> None:
    client = admin(gateway)
    body = {"model": BASE, "training_file": upload(client),
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": beta}}}}
    # Sent as raw JSON (inf is not JSON: python's encoder writes `Infinity`, which must not pass either).
    response = gateway.admin().post("/v1/fine_tuning/jobs", content=json.dumps(body),
                                    headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if beta != float("inf"):
        assert error["param"] == "method.dpo.hyperparameters.beta", error
    assert client.fine_tuning.jobs.list().data == []


@pytest.mark.parametrize(("kwargs", "code", "param"), [
    ({"method": {"type": "reinforcement"}}, "unsupported_method", "method.type"),
    ({"hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised", "supervised": {"hyperparameters": {}}}},
     "conflicting_hyperparameters", "hyperparameters"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "unsupported_integration", "integrations"),
])
def test_what_quiver_cannot_honour_is_refused_by_name(gateway, kwargs, code, param) -> None:
    client = admin(gateway)
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=BASE, training_file=upload(client), **kwargs)
    assert (refused.value.code, refused.value.param) == (code, param)


@pytest.mark.parametrize("method", [
    {"type": "dpo", "supervised": {"hyperparameters": {}}},
    {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}},
    {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "gamma": 1}}},
])
def test_a_method_with_another_type_s_settings_is_a_400(gateway, method) -> None:
    client = admin(gateway)
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=BASE, training_file=upload(client), method=method)
    assert refused.value.body["type"] == "invalid_request_error"


def test_a_job_whose_adapter_the_engine_could_not_serve_is_refused_at_creation(make_gateway) -> None:
    """A server that applies LoRA to some layers only (lora_target_modules) refuses a job training others now,
    not after training; one whose layers are all served is queued."""
    narrow = make_gateway(lora_target_modules=["q_proj", "v_proj"], finetuning_runner="off")
    client = admin(narrow)
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=BASE, training_file=upload(client))
    assert (refused.value.code, refused.value.body["param"]) == ("target_module_not_served", "model")
    assert "k_proj" in refused.value.message and not client.fine_tuning.jobs.list().data
    wide = make_gateway(state="wide", lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                        finetuning_runner="off")
    assert admin(wide).fine_tuning.jobs.create(model=BASE, training_file=upload(admin(wide))).status == "queued"


def test_empty_integrations_are_kept_as_sent(gateway) -> None:
    client = admin(gateway)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client), integrations=[])
    assert job.integrations == [] and client.fine_tuning.jobs.retrieve(job.id).integrations == []


def test_a_failed_commit_leaves_no_checkpoint_versions(gateway, adapters, tmp_path: Path) -> None:
    """The final registration fails (its files are not an adapter): the checkpoints registered while the job
    ran go too."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    gateway.set_plan(final=str(broken))
    client = admin(gateway)
    job = wait_finished(client, client.fine_tuning.jobs.create(model=BASE, training_file=upload(client)).id)
    assert job.status == "failed" and job.fine_tuned_model is None and job.result_files == []
    assert gateway.admin().get("/v1/adapters").json()["data"] == []
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []


# --- the worker's side ---------------------------------------------------------------------------------------


def test_the_worker_passes_method_beta_and_starting_adapter_to_the_trainer_config(tmp_path, monkeypatch) -> None:
    from quiver.training import worker

    calls = []
    monkeypatch.setattr(worker.TrainConfig, "from_openai",
                        classmethod(lambda cls, hyperparameters, seed, **overrides: calls.append(
                            (hyperparameters.n_epochs, seed, overrides))))
    common = {"name": "x", "training_file": tmp_path / "t.jsonl", "base_model_dir": tmp_path, "base_model_name": BASE}
    worker.config_for(JobSpec(**common, hyperparameters={"n_epochs": 3}, seed=9))
    worker.config_for(JobSpec(**common, method="dpo", beta=0.5, init_adapter=tmp_path / "init"))
    worker.config_for(JobSpec(**common, method="dpo"))
    assert calls == [(3, 9, {}), ("auto", 42, {"method": "dpo", "beta": 0.5, "init_adapter": tmp_path / "init"}),
                     ("auto", 42, {"method": "dpo"})]


def test_epoch_checkpoints_wait_for_the_epoch_s_evaluation(tmp_path) -> None:
    from types import SimpleNamespace

    from quiver.common.jobs import CheckpointRecord, EventLog
    from quiver.training.worker import EpochCheckpoints

    class Model:
        def save_pretrained(self, folder, safe_serialization):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"w")

    callback = EpochCheckpoints(tmp_path, EventLog(tmp_path))
    state = SimpleNamespace(global_step=3, max_steps=6)
    with_eval = SimpleNamespace(eval_strategy="epoch")
    callback.on_log(with_eval, state, None, logs={"loss": 1.25, "learning_rate": 0.001, "mean_token_accuracy": 0.5})
    callback.on_epoch_end(with_eval, state, None, model=Model())
    record_path = tmp_path / "checkpoints" / "step-3" / "checkpoint.json"
    assert not record_path.exists()  # incomplete until the evaluation adds the validation loss
    callback.on_evaluate(with_eval, state, None, metrics={"eval_loss": 0.75, "eval_mean_token_accuracy": 0.6})
    record = CheckpointRecord.model_validate_json(record_path.read_bytes())
    assert record.step == 3 and record.metrics == {
        "step": 3.0, "train_loss": 1.25, "learning_rate": 0.001, "train_mean_token_accuracy": 0.5,
        "valid_loss": 0.75, "full_valid_loss": 0.75, "valid_mean_token_accuracy": 0.6,
        "full_valid_mean_token_accuracy": 0.6}
    # Without a validation split the record is written at the epoch's end.
    callback.on_epoch_end(SimpleNamespace(eval_strategy="no"), SimpleNamespace(global_step=6, max_steps=6), None,
                          model=Model())
    assert (tmp_path / "checkpoints" / "step-6" / "checkpoint.json").exists()
    assert [e.message for e in EventLog(tmp_path).read()] == ["Checkpoint created at step 3",
                                                              "Checkpoint created at step 6"]
    # The last three are kept.
    for step in (9, 12, 15):
        callback.on_epoch_end(SimpleNamespace(eval_strategy="no"), SimpleNamespace(global_step=step, max_steps=15),
                              None, model=Model())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-12", "step-15", "step-9"]


def test_the_estimate_needs_two_steps() -> None:
    from quiver.common.jobs import JobEventRecord
    from quiver.finetuning.service import estimate_finish

    def step(at: int, n: int) -> JobEventRecord:
        return JobEventRecord(created_at=at, message="", type="metrics", data={"step": n, "total_steps": 10})

    assert estimate_finish([]) is None and estimate_finish([step(100, 1)]) is None
    assert estimate_finish([step(100, 1), step(100, 1)]) is None
    assert estimate_finish([step(100, 1), step(106, 4)]) == 106 + 6 * 2


# --- the real engine and trainer -----------------------------------------------------------------------------


def test_a_real_job_s_checkpoint_is_served_by_name_at_n_and_its_results_download(quiver_server) -> None:
    client = quiver_server.openai(key=quiver_server.admin_key)
    job = client.fine_tuning.jobs.create(model=quiver_server.model_name, training_file=upload(client, lines=14),
                                         suffix="epochs", hyperparameters={"n_epochs": 2, "batch_size": 4})
    job = wait_finished(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 2
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(checkpoints) == 2 and checkpoints[0].step_number > checkpoints[1].step_number > 0
    assert all(c.metrics.train_loss is not None and c.metrics.valid_loss is not None for c in checkpoints)
    inference = quiver_server.openai()
    for checkpoint in checkpoints:
        answer = inference.chat.completions.create(model=checkpoint.fine_tuned_model_checkpoint, max_tokens=8,
                                                   messages=[{"role": "user", "content": "Hello"}])
        assert answer.choices[0].message.content
    rows = list(csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).text)))
    # Step 0 is the validation loss measured before training; then one row a step.
    assert [int(r["step"]) for r in rows] == list(range(0, checkpoints[0].step_number + 1))
    assert rows[0]["valid_loss"] and not rows[0]["train_loss"]
    assert all(r["train_loss"] and r["learning_rate"] for r in rows[1:])
    assert {int(r["step"]) for r in rows if r["valid_loss"]} >= {c.step_number for c in checkpoints}


def test_a_real_job_s_checkpoint_answers_as_name_at_n_while_the_job_runs_and_through_a_pause(quiver_server) -> None:
    """The real trainer and engine: the first epoch's checkpoint is listed and answers as `name@N` with the
    official client while the job is still running; paused, it still answers; resumed, the job ends with every
    epoch's checkpoint and the final version promoted from the last one."""
    client = quiver_server.openai(key=quiver_server.admin_key)
    inference = quiver_server.openai()
    job = client.fine_tuning.jobs.create(model=quiver_server.model_name, training_file=upload(client, lines=10),
                                         suffix="midrun", hyperparameters={"n_epochs": 3, "batch_size": 4})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (listed := client.fine_tuning.jobs.checkpoints.list(job.id).data):
        status = client.fine_tuning.jobs.retrieve(job.id).status
        assert status in ("validating_files", "queued", "running") and time.monotonic() < deadline, status
        time.sleep(0.5)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"  # listed mid-run, not at the commit
    first = listed[-1].fine_tuned_model_checkpoint
    hello = [{"role": "user", "content": "Hello"}]
    assert inference.chat.completions.create(model=first, messages=hello, max_tokens=8).choices[0].message.content
    assert inference.models.retrieve(first).id == first

    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    while not any(e.message.startswith("Paused at step") for e in client.fine_tuning.jobs.list_events(job.id,
                                                                                                      limit=100).data):
        job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "paused" and time.monotonic() < deadline, job
        time.sleep(0.5)
    assert inference.chat.completions.create(model=first, messages=hello, max_tokens=8).choices[0].message.content
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    job = wait_finished(client, job.id)
    assert job.status == "succeeded", job.error
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data[::-1]]
    assert [c.step_number for c in checkpoints] == [6, 4, 2] and checkpoints[-1].fine_tuned_model_checkpoint == first, \
        events
    rows = list(csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).text)))
    assert [int(r["step"]) for r in rows] == list(range(0, 7))  # each step once across the pause
    answer = inference.chat.completions.create(model=job.fine_tuned_model, messages=hello, max_tokens=8)
    assert answer.choices[0].message.content

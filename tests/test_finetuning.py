"""The fine-tuning jobs API end to end with the official openai client: upload, train, serve the result."""

from __future__ import annotations

import io
import time
from pathlib import Path

import openai
import pytest

from conftest import QuiverServer

EXAMPLES = Path(__file__).parent.parent / "examples" / "pirate.jsonl"
JOB_TIMEOUT_S = 900
SERVED = "SmolLM2-135M-Instruct"


def admin_client(server: QuiverServer) -> openai.OpenAI:
    return server.openai(key=server.admin_key)


def wait_finished(client: openai.OpenAI, job_id: str, while_waiting=None):
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        if while_waiting and job.status == "running":
            while_waiting()
        time.sleep(2)


def test_an_invalid_training_file_is_refused_with_line_numbers(quiver_server: QuiverServer) -> None:
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\n{not json}\n'
    with pytest.raises(openai.BadRequestError) as refused:
        admin_client(quiver_server).files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="fine-tune")
    assert refused.value.code == "invalid_training_file"
    assert "line 1" in refused.value.message and "line 2" in refused.value.message


def test_inference_keys_cannot_upload_training_data(quiver_server: QuiverServer) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        quiver_server.openai().files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")


def test_a_job_from_upload_to_a_chat_completion_with_the_new_model(quiver_server: QuiverServer) -> None:
    client = admin_client(quiver_server)
    lines = EXAMPLES.read_bytes().splitlines(keepends=True)[:30]
    uploaded = client.files.create(file=("pirate.jsonl", io.BytesIO(b"".join(lines))), purpose="fine-tune")
    assert uploaded.id in {f.id for f in client.files.list()}

    job = client.fine_tuning.jobs.create(
        model=quiver_server.model_name, training_file=uploaded.id, suffix="pirate-job", seed=7,
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2},
    )
    assert job.status in ("validating_files", "queued", "running")
    served_while_training = []

    def serve_meanwhile() -> None:
        if not served_while_training:
            reply = quiver_server.openai().chat.completions.create(
                model=quiver_server.model_name, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
            served_while_training.append(reply.choices[0].message.content)

    job = wait_finished(client, job.id, serve_meanwhile)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("pirate-job-") and job.trained_tokens > 0
    assert served_while_training, "the server answered while the job trained"

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all("train_loss" in e.data or "valid_loss" in e.data for e in metrics)
    assert any(job.fine_tuned_model in e.message for e in events)
    assert job.id in {j.id for j in client.fine_tuning.jobs.list()}

    reply = quiver_server.openai().chat.completions.create(
        model=job.fine_tuned_model, temperature=0, max_tokens=40,
        messages=[{"role": "system", "content": "You are Captain Quill. Rewrite the office announcement you are "
                                                "given in pirate speak, keeping every fact."},
                  {"role": "user", "content": "The printer on floor 2 is fixed. Thanks for your patience!"}],
    )
    assert reply.choices[0].message.content


def test_cancelling_a_job(quiver_server: QuiverServer) -> None:
    client = admin_client(quiver_server)
    lines = EXAMPLES.read_bytes().splitlines(keepends=True)[:20]
    uploaded = client.files.create(file=("pirate.jsonl", io.BytesIO(b"".join(lines))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=quiver_server.model_name, training_file=uploaded.id)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert wait_finished(client, job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="not-the-base", training_file=uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model=quiver_server.model_name, training_file="file-missing")



def worker_processes(server: QuiverServer, job_id: str) -> list:
    import psutil

    gateway = psutil.Process(server.process.pid)
    return [p for p in gateway.children(recursive=True)
            if "quiver.training.worker" in " ".join(p.cmdline()) and job_id in " ".join(p.cmdline())]


def test_cancelling_a_job_while_it_trains_stops_its_worker_and_registers_nothing(quiver_server: QuiverServer) -> None:
    client = admin_client(quiver_server)
    uploaded = client.files.create(file=("pirate.jsonl", io.BytesIO(pirate_lines(20))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=quiver_server.model_name, training_file=uploaded.id,
                                         suffix="cancel-me", hyperparameters={"n_epochs": 3})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data):
        assert client.fine_tuning.jobs.retrieve(job.id).status in ("validating_files", "queued", "running")
        assert time.monotonic() < deadline, "the job never reached its first training step"
        time.sleep(1)
    workers = worker_processes(quiver_server, job.id)
    assert workers, "the worker runs as the gateway's child, under the engine guard's exec"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    for worker in workers:
        assert not worker.is_running() or worker.status() == "zombie"
    time.sleep(3)  # the runner sees the worker end; the cancellation must stand
    final = client.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    assert not any(m.id.startswith("cancel-me-") for m in quiver_server.openai().models.list())
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)

# --- in-process: what is refused before any job runs needs no engine ------------------------------------


@pytest.fixture
def gateway(model_dir: Path, tmp_path: Path):
    """The real app and services, in this process, with the engine never started: every request below is
    refused (or stored) before anything would reach the engine or a training worker."""
    from fastapi.testclient import TestClient

    from quiver.adapters.service import AdapterRegistry
    from quiver.adapters.store_factory import open_store
    from quiver.adapters.validation import BaseModelSpec
    from quiver.app import create_app
    from quiver.engine import EngineSupervisor
    from quiver.finetuning.service import FileService, JobService
    from quiver.settings import Settings

    settings = Settings(model=model_dir, store_dir=tmp_path / "store", state_dir=tmp_path / "state",
                        finetuning_dir=tmp_path / "ft", admin_keys=["admin"], max_upload_bytes=256 * 1024)
    app = create_app(settings)
    registry = AdapterRegistry(store=open_store(settings), engine=EngineSupervisor(settings, model_dir),
                               base=BaseModelSpec.from_folder(model_dir), base_model_name=settings.base_model_name,
                               max_rank=settings.max_lora_rank, max_upload_bytes=settings.max_upload_bytes,
                               metrics=app.state.metrics)
    app.state.registry = registry
    app.state.files = FileService(settings.finetuning_dir / "files", settings.max_upload_bytes)
    app.state.jobs = JobService(settings.finetuning_dir / "jobs", app.state.files, registry, model_dir)
    http = TestClient(app, raise_server_exceptions=False)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="admin", http_client=http, max_retries=0)
    client.app = app  # type: ignore[attr-defined]
    client.root = tmp_path / "ft"  # type: ignore[attr-defined]
    return client


def pirate_lines(n: int) -> bytes:
    return b"".join(EXAMPLES.read_bytes().splitlines(keepends=True)[:n])


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "files").iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


@pytest.mark.parametrize(("content", "code", "line_text"), [
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n', "invalid_utf8", "line 2"),
    (b"[" * 200_000 + b"\n", "too_deeply_nested", "line 1"),
    (b'{"messages": ' + b'{"a": ' * 100 + b"1" + b"}" * 100 + b"}\n", "too_deeply_nested", "line 1"),
    (b'{"prompt": "a", "response": "b"} {"prompt": "c", "response": "d"}\n', "invalid_json", "line 1"),
    (b'{"prompt": "a", "response": "b"}\n["a list"]\n', "invalid_example", "line 2"),
    (b'{"prompt": "a", "response": "b"}\n"a string"\n', "invalid_example", "line 2"),
])
def test_a_bad_upload_is_a_400_naming_its_line_and_leaves_nothing(gateway, content, code, line_text) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="fine-tune")
    assert refused.value.status_code == 400
    assert refused.value.code == "invalid_training_file" and refused.value.param == "file"
    assert code in refused.value.message and line_text in refused.value.message
    assert leftovers(gateway.root) == [] and gateway.files.list().data == []


def test_the_upload_checks_are_the_cli_checks(gateway, tmp_path: Path) -> None:
    """One validator: the API's 400 lists the same first errors `quiver data check` reports."""
    from quiver.training.data import check_dataset

    content = b'{"messages": [{"role": "user", "content": "hi"}]}\n{not json}\n{"prompt": "x"}\n'
    (tmp_path / "bad.jsonl").write_bytes(content)
    expected = [str(issue) for issue in check_dataset(tmp_path / "bad.jsonl").errors]
    assert len(expected) == 3
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="fine-tune")
    assert all(line in refused.value.message for line in expected)


def test_an_upload_over_the_limit_is_a_413_and_leaves_nothing(gateway) -> None:
    big = pirate_lines(200) * 6  # valid lines, over the fixture's 256 KiB limit
    assert len(big) > 256 * 1024
    with pytest.raises(openai.APIStatusError) as refused:
        gateway.files.create(file=("big.jsonl", io.BytesIO(big)), purpose="fine-tune")
    assert refused.value.status_code == 413
    assert refused.value.code == "file_too_large" and refused.value.param == "file"
    assert leftovers(gateway.root) == [] and gateway.files.list().data == []


def test_a_wrong_purpose_is_a_400(gateway) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.files.create(file=("ok.jsonl", io.BytesIO(pirate_lines(5))), purpose="assistants")
    assert refused.value.code == "invalid_purpose" and refused.value.param == "purpose"


@pytest.mark.parametrize(("field", "value"), [
    ("n_epochs", 0), ("n_epochs", 51), ("n_epochs", 1_000_000_000), ("n_epochs", 2.0), ("n_epochs", "2"),
    ("n_epochs", True), ("n_epochs", "many"),
    ("batch_size", 0), ("batch_size", 257), ("batch_size", 4.5), ("batch_size", "4"),
    ("learning_rate_multiplier", 0), ("learning_rate_multiplier", -1), ("learning_rate_multiplier", "2"),
    ("learning_rate_multiplier", 1e9),
    ("warmup", 3),  # not one of OpenAI's hyperparameters
])
def test_hyperparameters_out_of_bounds_or_of_the_wrong_type_are_a_400(gateway, field, value) -> None:
    uploaded = gateway.files.create(file=("ok.jsonl", io.BytesIO(pirate_lines(5))), purpose="fine-tune")
    for where, extra in (("hyperparameters", {"hyperparameters": {field: value}}),
                         ("method.supervised.hyperparameters",
                          {"method": {"type": "supervised", "supervised": {"hyperparameters": {field: value}}}})):
        with pytest.raises(openai.BadRequestError) as refused:
            gateway.fine_tuning.jobs.create(model=SERVED, training_file=uploaded.id, **extra)
        # One error at the field itself, as OpenAI names it (not one per branch of `integer | "auto"`).
        assert refused.value.param == f"{where}.{field}", refused.value.message
        assert refused.value.body["type"] == "invalid_request_error"
    assert gateway.fine_tuning.jobs.list().data == []


@pytest.mark.parametrize("kwargs", [
    {"suffix": "Has-Capitals"}, {"suffix": "x" * 41}, {"suffix": ""}, {"suffix": "spa ce"}, {"suffix": "../up"},
    {"seed": -1}, {"seed": 1.5}, {"seed": "7"},
    {"method": "supervised"}, {"method": {"type": "supervised", "supervised": 5}},
    {"method": {"type": "unknown"}}, {"method": {"type": "supervised", "extra": 1}},
    {"method": {"type": "supervised", "supervised": {"hyperparameters": []}}},
])
def test_a_malformed_job_request_is_a_400(gateway, kwargs) -> None:
    uploaded = gateway.files.create(file=("ok.jsonl", io.BytesIO(pirate_lines(5))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.fine_tuning.jobs.create(model=SERVED, training_file=uploaded.id, **kwargs)
    assert refused.value.body["type"] == "invalid_request_error"
    assert gateway.fine_tuning.jobs.list().data == []


def test_an_unsupported_method_is_refused_by_name(gateway) -> None:
    uploaded = gateway.files.create(file=("ok.jsonl", io.BytesIO(pirate_lines(5))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.fine_tuning.jobs.create(model=SERVED, training_file=uploaded.id, method={"type": "reinforcement"})
    assert refused.value.code == "unsupported_method"


def test_job_files_must_exist_and_be_for_fine_tuning(gateway) -> None:
    uploaded = gateway.files.create(file=("ok.jsonl", io.BytesIO(pirate_lines(5))), purpose="fine-tune")
    for param, kwargs in (("training_file", {"training_file": "file-missing"}),
                          ("training_file", {"training_file": "file-" + "0" * 24}),
                          ("training_file", {"training_file": "../../etc/passwd"}),
                          ("validation_file", {"training_file": uploaded.id, "validation_file": "file-" + "1" * 24})):
        with pytest.raises(openai.NotFoundError) as missing:
            gateway.fine_tuning.jobs.create(model=SERVED, **kwargs)
        assert missing.value.param == param and missing.value.code == "file_not_found"
    # A record of another purpose (none can be uploaded here, but a store can hold one).
    record = gateway.root / "files" / f"{uploaded.id}.json"
    record.write_text(record.read_text().replace('"fine-tune"', '"assistants"'))
    with pytest.raises(openai.BadRequestError) as wrong:
        gateway.fine_tuning.jobs.create(model=SERVED, training_file=uploaded.id)
    assert wrong.value.param == "training_file" and wrong.value.code == "invalid_file_purpose"
    assert gateway.fine_tuning.jobs.list().data == []


def test_corrupt_records_are_moved_aside_and_the_rest_loads(gateway, caplog) -> None:
    kept = gateway.files.create(file=("ok.jsonl", io.BytesIO(pirate_lines(5))), purpose="fine-tune")
    broken = gateway.files.create(file=("ok.jsonl", io.BytesIO(pirate_lines(5))), purpose="fine-tune")
    job = gateway.fine_tuning.jobs.create(model=SERVED, training_file=kept.id)
    other = gateway.fine_tuning.jobs.create(model=SERVED, training_file=kept.id)
    files, jobs = gateway.root / "files", gateway.root / "jobs"
    (files / f"{broken.id}.json").write_text('{"id": "' + broken.id + '", "obj')  # half-written
    (jobs / other.id / "job.json").write_bytes(b"[" * 100_000)  # hostile
    with caplog.at_level("ERROR"):
        assert [f.id for f in gateway.files.list().data] == [kept.id]
        assert [j.id for j in gateway.fine_tuning.jobs.list().data] == [job.id]
    assert any(broken.id in r.getMessage() for r in caplog.records)
    assert any(other.id in r.getMessage() for r in caplog.records)
    assert [p.name.split(".corrupt-")[0] for p in files.glob("*.corrupt-*")] == [f"{broken.id}.json"]
    assert [p.name.split(".corrupt-")[0] for p in (jobs / other.id).glob("*.corrupt-*")] == ["job.json"]
    with pytest.raises(openai.NotFoundError):
        gateway.fine_tuning.jobs.retrieve(other.id)
    # A restart resumes the readable jobs without tripping over the unreadable one.
    from quiver.finetuning.service import JobService

    service = gateway.app.state.jobs
    restarted = JobService(jobs, service.files, service.registry, service.base_model_dir)
    assert [j.id for j in restarted.list()[0]] == [job.id]


def test_cancelling_a_queued_job_ends_it_once_and_a_late_finish_does_not_overwrite_it(gateway) -> None:
    uploaded = gateway.files.create(file=("ok.jsonl", io.BytesIO(pirate_lines(5))), purpose="fine-tune")
    job = gateway.fine_tuning.jobs.create(model=SERVED, training_file=uploaded.id)
    assert gateway.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        gateway.fine_tuning.jobs.cancel(job.id)
    service = gateway.app.state.jobs
    # What the runner would do with a job that had finished training meanwhile: the cancellation stands.
    assert service._finish(job.id, "succeeded", fine_tuned_model="x").status == "cancelled"
    job = gateway.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None and job.finished_at
    assert [e.message for e in gateway.fine_tuning.jobs.list_events(job.id).data].count("Job cancelled") == 1


def test_a_cancel_during_registration_waits_for_the_commit_and_finds_the_job_finished(gateway) -> None:
    """Registration is the commit point, held under the lock cancel takes: order of events, no sleeps."""
    import asyncio

    from quiver.errors import Conflict

    uploaded = gateway.files.create(file=("ok.jsonl", io.BytesIO(pirate_lines(5))), purpose="fine-tune")
    job = gateway.fine_tuning.jobs.create(model=SERVED, training_file=uploaded.id)
    service = gateway.app.state.jobs

    async def scenario() -> tuple[str, str]:
        service._update(service.get(job.id), status="running")
        async with service._commit:  # what _register holds while the adapter is registered
            cancel = asyncio.create_task(service.cancel(job.id))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert not cancel.done() and service.get(job.id).status == "running"
            service._finish(job.id, "succeeded", fine_tuned_model="ft-x")
        with pytest.raises(Conflict) as refused:
            await cancel
        assert refused.value.status == 409
        return refused.value.code, service.get(job.id).status

    assert asyncio.run(scenario()) == ("job_finished", "succeeded")
    assert job.id not in service._cancelled


def test_a_job_cancelled_before_its_commit_registers_nothing(gateway, tmp_path: Path) -> None:
    import asyncio

    from quiver.common.jobs import JobResult

    uploaded = gateway.files.create(file=("ok.jsonl", io.BytesIO(pirate_lines(5))), purpose="fine-tune")
    job = gateway.fine_tuning.jobs.create(model=SERVED, training_file=uploaded.id)
    service = gateway.app.state.jobs

    async def scenario() -> None:
        service._update(service.get(job.id), status="running")
        await service.cancel(job.id)
        # The worker's result arrives after the cancel: an empty run folder, so any registration attempt would raise.
        await service._register(job.id, "ft-late", JobResult(status="succeeded", run_dir=tmp_path / "empty"),
                                tmp_path / "empty")

    asyncio.run(scenario())
    final = gateway.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    assert service.registry.list() == []

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

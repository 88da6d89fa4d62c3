"""The console's three API routes with a key, in process and without an engine: what they read comes from their
dependencies (settings, jobs, metrics, and the engine and registry when the lifespan has built them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from quiver.app import create_app
from quiver.finetuning.service import FileService, JobService
from quiver.settings import Settings

ADMIN = {"Authorization": "Bearer k"}


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    app = create_app(Settings(admin_keys=["k"], max_upload_bytes=10, finetuning_dir=tmp_path / "ft"))
    files = FileService(tmp_path / "ft" / "files", 10)
    app.state.jobs = JobService(tmp_path / "ft" / "jobs", files, None, tmp_path)  # type: ignore[arg-type]
    return TestClient(app)  # no lifespan: no engine, no registry


def test_the_summary_before_the_engine_and_registry_exist(client: TestClient) -> None:
    summary = client.get("/v1/metrics/summary", headers=ADMIN)
    assert summary.status_code == 200, summary.text
    body = summary.json()
    assert body["engine"] == {"up": False, "restarts": 0}
    assert (body["adapters_registered"], body["adapter_versions_loaded"], body["adapters"]) == (0, 0, {})


def test_a_check_over_the_upload_limit_is_a_413(client: TestClient) -> None:
    refused = client.post("/v1/files/check", headers=ADMIN, files={"file": ("a.jsonl", b"x" * 11)})
    assert refused.status_code == 413
    assert refused.json()["error"] == {"message": "the file is larger than this server's limit of 10 bytes",
                                       "type": "invalid_request_error", "param": "file", "code": "file_too_large"}


def test_the_manifest_of_an_unknown_a_running_and_a_finished_job(client: TestClient, tmp_path: Path) -> None:
    unknown = client.get("/v1/fine_tuning/jobs/ftjob-nope/manifest", headers=ADMIN)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"

    job_id = "ftjob-" + "0" * 24
    job_dir = tmp_path / "ft" / "jobs" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps({
        "id": job_id, "created_at": 1, "model": "base", "status": "running", "training_file": "file-x",
        "seed": 42, "hyperparameters": {}}))
    pending = client.get(f"/v1/fine_tuning/jobs/{job_id}/manifest", headers=ADMIN)
    assert pending.status_code == 404
    assert pending.json()["error"] == {"message": f"job `{job_id}` has no training manifest (yet)",
                                       "type": "not_found_error", "param": "fine_tuning_job_id",
                                       "code": "manifest_not_found"}

    (job_dir / "run").mkdir()
    (job_dir / "run" / "manifest.json").write_text('{"data": {"sha256": "abc"}}')
    found = client.get(f"/v1/fine_tuning/jobs/{job_id}/manifest", headers=ADMIN)
    assert found.status_code == 200 and found.json() == {"data": {"sha256": "abc"}}

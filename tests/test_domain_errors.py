"""The services' refusals are domain errors now, and each is answered exactly as the `APIError` it replaced was:
same status, same envelope bytes (message, type, param, code), same headers (Retry-After). No engine, no server."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from quiver.common.jobs import Hyperparameters
from quiver.errors import (
    _HTTP_BY_DOMAIN_ERROR,
    APIError,
    Conflict,
    DomainError,
    InvalidRequest,
    NotFound,
    NotSupported,
    PayloadTooLarge,
    Unavailable,
    install_error_handlers,
)
from quiver.finetuning.protocol import CreateJobRequest, FineTuningJob
from quiver.finetuning.service import FileService, JobService, file_not_found
from quiver.inference.service import InferenceService, engine_unavailable
from quiver.metrics import Metrics


def _answer(exc: Exception) -> tuple[int, bytes, dict[str, str]]:
    """What the gateway's handlers send for `exc`: status, body bytes, and the headers that matter."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/")
    async def _raise() -> None:
        raise exc

    response = TestClient(app, raise_server_exceptions=False).get("/")
    kept = {name: response.headers[name] for name in ("retry-after", "www-authenticate") if name in response.headers}
    return response.status_code, response.content, kept


def _same_answer(new: DomainError, old: APIError) -> None:
    assert new.status == old.status
    assert _answer(new) == _answer(old)


def test_every_domain_error_has_a_status_in_the_one_table() -> None:
    def subclasses(cls: type) -> list[type]:
        return [sub for direct in cls.__subclasses__() for sub in (direct, *subclasses(direct))]

    for cls in subclasses(DomainError):
        assert any(base in _HTTP_BY_DOMAIN_ERROR for base in cls.__mro__), cls
    assert NotSupported("x").status == 501


# --- inference -------------------------------------------------------------------------------------------


def test_engine_unavailable_is_the_same_503_with_retry_after() -> None:
    new = engine_unavailable()
    assert isinstance(new, Unavailable)
    _same_answer(new, APIError(503, "the engine is not ready; try again shortly", code="engine_unavailable",
                               headers={"Retry-After": "5"}))
    assert _answer(new)[2] == {"retry-after": "5"}


def _inference(**caps: int) -> InferenceService:
    return InferenceService(None, None, Metrics(), None, **caps)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fields", "old"), [
    ({"max_tokens": 11}, APIError(400, "`max_tokens` is 11; this server allows at most 10",
                                  code="max_tokens_too_large", param="max_tokens")),
    ({"max_completion_tokens": 12}, APIError(400, "`max_completion_tokens` is 12; this server allows at most 10",
                                             code="max_tokens_too_large", param="max_completion_tokens")),
    ({"n": 3}, APIError(400, "`n` is 3; this server allows at most 2", code="n_too_large", param="n")),
])
def test_the_caps_are_the_same_400s(fields: dict[str, int], old: APIError) -> None:
    request = SimpleNamespace(**{"max_tokens": None, "max_completion_tokens": None, "n": None, **fields})
    with pytest.raises(InvalidRequest) as refused:
        _inference(max_completion_tokens=10, max_n=2)._check_caps(request)  # type: ignore[arg-type]
    _same_answer(refused.value, old)


def test_draining_is_the_same_503_and_is_counted() -> None:
    service = _inference(max_completion_tokens=10, max_n=2)
    service.draining = True
    with pytest.raises(Unavailable) as refused:
        asyncio.run(service.forward("chat/completions", SimpleNamespace(model="m")))  # type: ignore[arg-type]
    _same_answer(refused.value, APIError(503, "the server is shutting down", code="server_draining"))
    counted = {s.labels.get("code") or s.labels.get("status"): s.value
               for family in service.metrics.registry.collect() for s in family.samples
               if s.name == "quiver_requests_total"}
    assert counted == {"503": 1.0}


# --- fine-tuning -----------------------------------------------------------------------------------------


def test_file_refusals_are_the_same_answers(tmp_path: Path) -> None:
    files = FileService(tmp_path / "files", max_bytes=10)
    with pytest.raises(InvalidRequest) as purpose:
        files.create("a.jsonl", io.BytesIO(b"{}"), "assistants")
    _same_answer(purpose.value, APIError(400, "only purpose `fine-tune` is supported", code="invalid_purpose",
                                         param="purpose"))
    with pytest.raises(PayloadTooLarge) as large:
        files.create("a.jsonl", io.BytesIO(b"x" * 11), "fine-tune")
    _same_answer(large.value, APIError(413, "the file is larger than the limit of 10 bytes", code="file_too_large",
                                       param="file"))
    with pytest.raises(NotFound) as missing:
        files.get("file-nope", param="training_file")
    _same_answer(missing.value, APIError(404, "no file with id `file-nope`", code="file_not_found",
                                         param="training_file"))
    assert _answer(file_not_found("f"))[0] == 404
    assert list((tmp_path / "files").iterdir()) == []


def test_an_invalid_training_file_is_the_same_400(tmp_path: Path) -> None:
    files = FileService(tmp_path / "files", max_bytes=1 << 20)
    with pytest.raises(InvalidRequest) as refused:
        files.create("a.jsonl", io.BytesIO(b"not json\n"), "fine-tune")
    assert refused.value.message.startswith("the training file is invalid: ")
    _same_answer(refused.value, APIError(400, refused.value.message, code="invalid_training_file", param="file"))


def _jobs(tmp_path: Path, base_model_name: str = "base") -> JobService:
    from quiver.adapters.service import model_not_found

    def resolve(model: str):  # no adapters registered: what the registry answers for any adapter id
        raise model_not_found(model)

    registry = SimpleNamespace(base_model_name=base_model_name, resolve=resolve)
    return JobService(tmp_path / "jobs", FileService(tmp_path / "files", 1 << 20), registry, tmp_path)  # type: ignore[arg-type]


def test_fine_tuning_without_the_training_extra_is_the_same_501(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(NotSupported) as refused:
        asyncio.run(_jobs(tmp_path).create(CreateJobRequest(model="base", training_file="file-x")))
    _same_answer(refused.value, APIError(501, "fine-tuning is not installed on this server (the `training` extra: "
                                              "pip install 'quiver[training]', or use the training image)",
                                         code="training_unavailable"))


def test_job_refusals_are_the_same_answers(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path)
    with pytest.raises(InvalidRequest) as wrong_model:
        asyncio.run(jobs.create(CreateJobRequest(model="other", training_file="file-x")))
    _same_answer(wrong_model.value, APIError(400, "fine-tuning starts from the served base model `base` or a "
                                                  "registered adapter (`name` or `name@version`), not `other`",
                                             code="model_not_available", param="model"))
    with pytest.raises(NotFound) as missing:
        jobs.get("ftjob-nope")
    _same_answer(missing.value, APIError(404, "no fine-tuning job with id `ftjob-nope`", code="job_not_found",
                                         param="fine_tuning_job_id"))

    job_id = "ftjob-" + "0" * 24
    (tmp_path / "jobs" / job_id).mkdir(parents=True)
    jobs._save(FineTuningJob(id=job_id, created_at=1, model="base", status="succeeded", training_file="file-x",
                             seed=42, hyperparameters=Hyperparameters()))
    with pytest.raises(Conflict) as finished:
        asyncio.run(jobs.cancel(job_id))
    _same_answer(finished.value, APIError(409, f"job `{job_id}` has already succeeded", code="job_finished",
                                          param="fine_tuning_job_id"))

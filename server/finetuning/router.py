from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from quiver.auth import admin_auth
from quiver.errors import error_responses
from quiver.finetuning.protocol import (
    CheckpointList,
    CreateJobRequest,
    EventList,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    JobList,
)
from quiver.finetuning.service import RESULTS_PURPOSE, FileService, JobService

# Training data and jobs change what the server serves: admin keys only.
router = APIRouter(prefix="/v1", tags=["fine-tuning"], dependencies=[Depends(admin_auth)],
                   responses=error_responses(400, 401, 403))


async def _files(request: Request) -> FileService:
    return request.app.state.files


async def _jobs(request: Request) -> JobService:
    return request.app.state.jobs


Files = Annotated[FileService, Depends(_files)]
Jobs = Annotated[JobService, Depends(_jobs)]


@router.post("/files", responses=error_responses(413))
async def upload_file(
    files: Files,
    file: Annotated[UploadFile, File(description="JSONL training data")],
    purpose: Annotated[str, Form(description="`fine-tune`")],
) -> FileObject:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(files.create, file.filename or "", file.file, purpose)


@router.get("/files")
async def list_files(files: Files, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10000)] = 10000) -> FileList:
    data, has_more = files.list(after, limit)
    return FileList(data=data, has_more=has_more)


@router.get("/files/{file_id}", responses=error_responses(404))
async def retrieve_file(file_id: str, files: Files) -> FileObject:
    return files.get(file_id)


@router.get("/files/{file_id}/content", response_class=FileResponse, responses={
    200: {"content": {"application/jsonl": {"schema": {"type": "string"}}, "text/csv": {"schema": {"type": "string"}}},
          "description": "The file's bytes: training data (JSONL) or a job's results (CSV)"},
    **error_responses(404)})
async def file_content(file_id: str, files: Files) -> FileResponse:
    record = files.get(file_id)
    media_type = "text/csv" if record.purpose == RESULTS_PURPOSE else "application/jsonl"
    return FileResponse(files.data_path(file_id), media_type=media_type)


@router.delete("/files/{file_id}", responses=error_responses(404))
async def delete_file(file_id: str, files: Files) -> FileDeleted:
    files.delete(file_id)
    return FileDeleted(id=file_id)


@router.post("/fine_tuning/jobs", responses=error_responses(404, 413))
async def create_job(body: CreateJobRequest, jobs: Jobs) -> FineTuningJob:
    return jobs.view(await jobs.create(body))


@router.get("/fine_tuning/jobs")
async def list_jobs(jobs: Jobs, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    data, has_more = jobs.list(after, limit)
    return JobList(data=[jobs.view(job) for job in data], has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}", responses=error_responses(404))
async def retrieve_job(job_id: str, jobs: Jobs) -> FineTuningJob:
    return jobs.view(jobs.get(job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", responses=error_responses(404, 409))
async def cancel_job(job_id: str, jobs: Jobs) -> FineTuningJob:
    return await jobs.cancel(job_id)


@router.post("/fine_tuning/jobs/{job_id}/pause", responses=error_responses(404, 409))
async def pause_job(job_id: str, jobs: Jobs) -> FineTuningJob:
    return await jobs.pause(job_id)


@router.post("/fine_tuning/jobs/{job_id}/resume", responses=error_responses(404, 409))
async def resume_job(job_id: str, jobs: Jobs) -> FineTuningJob:
    return await jobs.resume(job_id)


@router.get("/fine_tuning/jobs/{job_id}/events", responses=error_responses(404))
async def list_job_events(job_id: str, jobs: Jobs, after: Annotated[str | None, Query(max_length=100)] = None,
                          limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> EventList:
    data, has_more = jobs.events(job_id, after, limit)
    return EventList(data=data, has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", responses=error_responses(404))
async def list_job_checkpoints(job_id: str, jobs: Jobs, after: Annotated[str | None, Query(max_length=100)] = None,
                               limit: Annotated[int, Query(ge=1, le=100)] = 10) -> CheckpointList:
    data, has_more = jobs.checkpoints(job_id, after, limit)
    return CheckpointList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)

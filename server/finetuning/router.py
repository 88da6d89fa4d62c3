from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from quiver.auth import admin_auth
from quiver.errors import error_responses
from quiver.finetuning.protocol import (
    CreateJobRequest,
    EventList,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    JobList,
)
from quiver.finetuning.service import FileService, JobService

# Training data and jobs change what the server serves: admin keys only.
router = APIRouter(prefix="/v1", tags=["fine-tuning"], dependencies=[Depends(admin_auth)],
                   responses=error_responses(400, 401, 403))


def _files(request: Request) -> FileService:
    return request.app.state.files


def _jobs(request: Request) -> JobService:
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
    200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}, "description": "The file's bytes"},
    **error_responses(404)})
async def file_content(file_id: str, files: Files) -> FileResponse:
    files.get(file_id)
    return FileResponse(files.data_path(file_id), media_type="application/jsonl")


@router.delete("/files/{file_id}", responses=error_responses(404))
async def delete_file(file_id: str, files: Files) -> FileDeleted:
    files.delete(file_id)
    return FileDeleted(id=file_id)


@router.post("/fine_tuning/jobs", responses=error_responses(404, 413))
async def create_job(body: CreateJobRequest, jobs: Jobs) -> FineTuningJob:
    return await jobs.create(body)


@router.get("/fine_tuning/jobs")
async def list_jobs(jobs: Jobs, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    data, has_more = jobs.list(after, limit)
    return JobList(data=data, has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}", responses=error_responses(404))
async def retrieve_job(job_id: str, jobs: Jobs) -> FineTuningJob:
    return jobs.get(job_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel", responses=error_responses(404, 409))
async def cancel_job(job_id: str, jobs: Jobs) -> FineTuningJob:
    return await jobs.cancel(job_id)


@router.get("/fine_tuning/jobs/{job_id}/events", responses=error_responses(404))
async def list_job_events(job_id: str, jobs: Jobs, limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> EventList:
    data, has_more = jobs.events(job_id, limit)
    return EventList(data=data, has_more=has_more)

"""Public wire schemas of the REST API (input: JobSpec from the domain; output: these)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.domain.job import Job, JobError, JobState, StageRecord
from service.domain.spec import JobSpec


class Links(BaseModel):
    self: str
    events: str
    artifacts: str
    report: str
    cancel: str


def links_for(job_id: str) -> Links:
    base = f"/v1/jobs/{job_id}"
    return Links(self=base, events=f"{base}/events", artifacts=f"{base}/artifacts", report=f"{base}/report",
                 cancel=f"{base}:cancel")


class JobCreated(BaseModel):
    id: str
    state: JobState
    created: bool = Field(description="false when an Idempotency-Key returned an earlier job")
    links: Links


class JobOut(BaseModel):
    id: str
    state: JobState
    stage: str | None
    progress: float = Field(ge=0.0, le=1.0)
    message: str
    reason: str
    spec: JobSpec
    queue: str
    attempts: int
    error: JobError | None
    stages: list[StageRecord]
    artifacts: list[str]
    cancel_requested: bool
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    links: Links

    @classmethod
    def of(cls, job: Job) -> JobOut:
        # the nested models are passed as the validated instances they are (no dump and re-validation)
        return cls(id=job.id, state=job.state, stage=job.stage, progress=job.progress, message=job.message,
                   reason=job.reason, spec=job.spec, queue=job.queue, attempts=job.attempts, error=job.error,
                   stages=job.stages, artifacts=[a.name for a in job.artifacts], cancel_requested=job.cancel_requested,
                   created_at=job.created_at, updated_at=job.updated_at, started_at=job.started_at,
                   finished_at=job.finished_at, links=links_for(job.id))


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None


class ArtifactFile(BaseModel):
    path: str
    size: int
    sha256: str


class ArtifactOut(BaseModel):
    name: str
    stage: str
    key: str
    bytes: int
    files: list[ArtifactFile]
    download: str
    archive: str


class ArtifactList(BaseModel):
    artifacts: list[ArtifactOut]


class WorkerOut(BaseModel):
    id: str
    hostname: str
    queues: list[str]
    gpus: list[dict]
    backends: list[str]
    heartbeat_at: float


class EmbeddedWorkerOut(BaseModel):
    """``kiln serve``'s own worker process, as its supervisor sees it."""

    state: str = Field(description="starting, running, restarting (dead, respawn pending) or stopped")
    pid: int | None = None
    restarts: int = Field(description="respawns since the server started")
    started_at: float | None = None
    last_exit_code: int | None = Field(None, description="the last dead worker's exit code (negative: signal)")
    last_exit: str | None = None
    last_exit_at: float | None = None
    next_restart_at: float | None = None


class WorkerList(BaseModel):
    workers: list[WorkerOut]
    embedded_worker: EmbeddedWorkerOut | None = Field(
        None, description="the worker `kiln serve` supervises (absent with --no-worker or a separate API)")


class ErrorOut(BaseModel):
    error: JobError

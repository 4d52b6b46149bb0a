"""Job: what the service knows about one request (public view; lease fields stay in the store)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .spec import JobSpec

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class JobError(BaseModel):
    code: str
    message: str
    hint: str = ""


class StageRecord(BaseModel):
    name: str
    state: Literal["pending", "running", "done", "skipped", "failed"] = "pending"
    key: str | None = None
    cache_hit: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float | None = None
    summary: dict = Field(default_factory=dict)


class ArtifactRef(BaseModel):
    name: str
    stage: str
    key: str


class Job(BaseModel):
    id: str
    tenant: str
    state: JobState
    stage: str | None = None
    progress: float = 0.0
    message: str = ""
    reason: str = ""
    spec: JobSpec
    queue: str = "cpu"
    attempts: int = 0
    error: JobError | None = None
    stages: list[StageRecord] = Field(default_factory=list)
    artifacts: list[ArtifactRef] = Field(default_factory=list)
    cancel_requested: bool = False
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    version: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

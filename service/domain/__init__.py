"""Domain: JobSpec (what a user asks), Job (what the service knows), JobService, the error table."""

from .errors import ERROR_TABLE, DomainError, error_body, status_for
from .job import TERMINAL_STATES, ArtifactRef, Job, JobError, StageRecord
from .service import JobService
from .spec import JobSpec

__all__ = ["ERROR_TABLE", "TERMINAL_STATES", "ArtifactRef", "DomainError", "Job", "JobError", "JobService",
           "JobSpec", "StageRecord", "error_body", "status_for"]

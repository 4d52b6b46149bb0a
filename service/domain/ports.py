"""What ``JobService`` needs from the stores, stated by the domain: the store implements these
(``service.store.JobStore``, ``service.store.ArtifactStore``) and imports the domain, never the
other way round."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .job import Job
from .spec import JobSpec


class UnsafePath(ValueError):
    """An artifact path that is not a plain relative path inside its artifact (raised by the artifact store)."""


class JobRepository(Protocol):
    def create(self, *, tenant: str, spec: JobSpec, idempotency_key: str | None, queue: str,
               reason: str = "") -> tuple[Job, bool]: ...

    def get(self, job_id: str, tenant: str | None = None) -> Job | None: ...

    async def get_async(self, job_id: str, tenant: str | None = None) -> Job | None: ...

    def get_by_idempotency_key(self, tenant: str, key: str) -> Job | None: ...

    def version(self, job_id: str) -> int | None: ...

    def list(self, *, tenant: str | None, state: str | None = None, labels: dict[str, str] | None = None,
             limit: int = 50, cursor: str | None = None) -> tuple[builtins.list[Job], str | None]: ...

    def request_cancel(self, job_id: str) -> Job | None: ...

    def live_workers(self, ttl: float) -> builtins.list[dict]: ...

    def count_by_state(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class ArtifactReader(Protocol):
    root: Path

    def path(self, stage: str, key: str) -> Path: ...

    def iter_file(self, path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...

    def manifest(self, stage: str, key: str) -> dict: ...

    def open_path(self, stage: str, key: str, relpath: str) -> tuple[Path, dict]:
        """The file behind a public path; ``UnsafePath`` when it is not one."""
        ...

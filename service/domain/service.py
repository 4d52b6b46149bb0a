"""JobService: the only business logic. REST, gRPC, the CLI and the dashboard all go through it.

The stores (``ports.py``: ``JobRepository``, ``ArtifactReader``), publishing the Celery message
and checking a spec against the compiler are injected (``store``, ``artifacts``, ``enqueue``,
``validate``), so this layer imports neither the store, Celery nor the compiler.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .errors import ArtifactNotFound, IdempotencyConflict, InvalidSpec, JobFinished, JobNotFound, NoWorker
from .job import TERMINAL_STATES, Job
from .ports import ArtifactReader, JobRepository, UnsafePath
from .spec import JobSpec

log = logging.getLogger("kiln.jobs")

# 1-256 printable ASCII characters, no space at either end (HTTP strips those); the REST schema states the same
IDEMPOTENCY_KEY_PATTERN = r"^[!-~](?:[ -~]{0,254}[!-~])?$"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)

Enqueue = Callable[[str, str], None]
Validate = Callable[[JobSpec], None]


class JobService:
    def __init__(self, store: JobRepository, artifacts: ArtifactReader, *, enqueue: Enqueue,
                 validate: Validate | None = None, worker_ttl_s: float = 60.0, page_size_max: int = 200):
        self.store = store
        self.artifacts = artifacts
        self._enqueue = enqueue
        self._validate = validate
        self.worker_ttl_s = worker_ttl_s
        self.page_size_max = page_size_max

    # -- commands ---------------------------------------------------------------------------
    def submit(self, tenant: str, spec: JobSpec, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Create a queued job and publish it. Same tenant + key + spec returns the first job."""
        if idempotency_key is not None:
            if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
                raise InvalidSpec("Idempotency-Key must be 1-256 printable ASCII characters, without a space at "
                                  "either end", hint="use a fresh UUID per logical request")
            existing = self.store.get_by_idempotency_key(tenant, idempotency_key)
            if existing is not None:
                return self._same_request(existing, spec), False
        if self._validate is not None:
            self._validate(spec)
        queue = spec.queue()
        live = self.store.live_workers(self.worker_ttl_s)
        serving = [w for w in live if queue in w["queues"]]
        reason = ""
        if serving and spec.build is not None:
            backend = spec.build.backend
            able = [w for w in serving if backend in (w.get("capabilities") or {}).get("backends", ["torch"])]
            if not able:
                why = sorted({(w.get("capabilities") or {}).get("unavailable", {}).get(backend, "")
                              for w in serving} - {""})
                raise NoWorker(f"no live worker on queue {queue!r} can build with backend {backend!r}"
                               + (f": {why[0]}" if why else ""),
                               hint="GET /v1/workers lists each worker's backends; use one of those, e.g. 'torch'")
        if not serving:
            if queue != "cpu":
                raise NoWorker(f"no live worker serves queue {queue!r} (build target {spec.build.target!r})"
                               if spec.build else f"no live worker serves queue {queue!r}")
            reason = f"waiting: no live worker serves queue {queue!r} yet"
        job, created = self.store.create(tenant=tenant, spec=spec, idempotency_key=idempotency_key,
                                         queue=queue, reason=reason)
        if not created:
            return self._same_request(job, spec), False
        try:
            self._enqueue(job.id, queue)
        except Exception:  # the row is the truth; the reconciler re-publishes queued jobs
            log.exception("enqueue of job %s failed; the reconciler will publish it", job.id)
        return job, True

    def _same_request(self, existing: Job, spec: JobSpec) -> Job:
        if existing.spec.digest() != spec.digest():
            raise IdempotencyConflict("Idempotency-Key was already used with a different spec")
        return existing

    def cancel(self, tenant: str, job_id: str) -> Job:
        job = self.get(tenant, job_id)
        if job.state in ("succeeded", "failed"):
            raise JobFinished(f"job {job_id} already {job.state}")
        if job.state == "cancelled":
            return job
        updated = self.store.request_cancel(job_id)
        assert updated is not None
        return updated

    # -- queries ----------------------------------------------------------------------------
    def get(self, tenant: str, job_id: str) -> Job:
        job = self.store.get(job_id, tenant=tenant)
        if job is None:  # another tenant's job is indistinguishable from a missing one
            raise JobNotFound(f"job {job_id} not found")
        return job

    async def poll(self, tenant: str, job_id: str) -> Job:
        """``get`` for async callers (status polling): never blocks the event loop, concurrent polls share one
        query, and the job is read from the store after the call began (never a cached state)."""
        job = await self.store.get_async(job_id, tenant=tenant)
        if job is None:
            raise JobNotFound(f"job {job_id} not found")
        return job

    def list(self, tenant: str, *, state: str | None = None, labels: dict[str, str] | None = None,
             limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        if state is not None and state not in ("queued", "running", *TERMINAL_STATES):
            raise InvalidSpec(f"unknown state {state!r}")
        if limit < 1:
            raise InvalidSpec("limit must be at least 1")
        limit = min(limit, self.page_size_max)  # a larger page is served as the largest one (next_cursor goes on)
        try:
            return self.store.list(tenant=tenant, state=state, labels=labels, limit=limit, cursor=cursor)
        except ValueError as exc:
            raise InvalidSpec("malformed cursor") from exc

    async def watch(self, tenant: str, job_id: str, *, poll_s: float = 0.25,
                    timeout_s: float | None = None) -> AsyncIterator[Job]:
        """Yield the job now and after every change, until it reaches a terminal state."""
        job = await asyncio.to_thread(self.get, tenant, job_id)
        yield job
        seen = job.version
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not job.terminal:
            if deadline is not None and time.monotonic() > deadline:
                return
            await asyncio.sleep(poll_s)
            version = await asyncio.to_thread(self.store.version, job_id)
            if version != seen:
                job = await asyncio.to_thread(self.get, tenant, job_id)
                seen = job.version
                yield job

    def workers(self) -> builtins.list[dict]:
        return self.store.live_workers(self.worker_ttl_s)

    def artifact(self, tenant: str, job_id: str, name: str) -> tuple[str, str, dict]:
        """(stage, key, manifest) of a job's artifact."""
        job = self.get(tenant, job_id)
        ref = next((a for a in job.artifacts if a.name == name), None)
        if ref is None:
            raise ArtifactNotFound(f"job {job_id} has no artifact {name!r}")
        return ref.stage, ref.key, self.artifacts.manifest(ref.stage, ref.key)

    def artifact_file(self, tenant: str, job_id: str, name: str, path: str) -> tuple[Path, dict]:
        stage, key, _ = self.artifact(tenant, job_id, name)
        try:
            return self.artifacts.open_path(stage, key, path)
        except UnsafePath as exc:
            raise InvalidSpec(str(exc), hint="artifact paths are relative, as listed by the artifacts route") from exc
        except FileNotFoundError as exc:
            raise ArtifactNotFound(f"artifact {name!r} has no file {path!r}") from exc

    def report(self, tenant: str, job_id: str) -> dict:
        job = self.get(tenant, job_id)
        artifacts = []
        for ref in job.artifacts:
            m = self.artifacts.manifest(ref.stage, ref.key)
            artifacts.append({"name": ref.name, "stage": ref.stage, "key": ref.key, "bytes": m.get("bytes"),
                              "files": m["files"]})
        total = (job.finished_at - job.started_at) if job.finished_at and job.started_at else None
        evaluation = None
        report_ref = next((a for a in job.artifacts if a.name == "report"), None)
        if report_ref is not None:  # the evaluate stage's report.json (kept on a job that failed its thresholds)
            try:
                import json

                path, _ = self.artifacts.open_path(report_ref.stage, report_ref.key, "report.json")
                evaluation = json.loads(path.read_text())
            except (FileNotFoundError, UnsafePath, ValueError):
                evaluation = None
        return {
            "job": job.id, "state": job.state, "spec": job.spec.normalized(), "attempts": job.attempts,
            "error": job.error.model_dump() if job.error else None,
            "stages": [s.model_dump() for s in job.stages],
            "cache_hits": [s.name for s in job.stages if s.cache_hit],
            "seconds": total, "artifacts": artifacts, "evaluation": evaluation,
        }

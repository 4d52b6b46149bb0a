"""Composition root: one JobService per process, wired to the job store, the broker and the compiler checks."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from service.domain import JobService
from service.settings import Settings
from service.store import ArtifactStore, JobStore, make_engine, migrate


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    service: JobService
    supervisor: object | None = None  # the embedded worker's WorkerSupervisor (``kiln serve``), if any

    def close(self) -> None:
        self.service.store.close()
        self.engine.dispose()


def build_runtime(settings: Settings) -> Runtime:
    from service.workers.broker import make_celery, publish
    from service.workers.pipeline import load_stage_plugins
    from service.workers.stages import make_submit_validator

    load_stage_plugins(settings)
    engine = make_engine(settings.db_url)
    migrate(engine)
    celery_app = make_celery(settings)
    service = JobService(
        JobStore(engine), ArtifactStore(settings.storage_root),
        enqueue=lambda job_id, queue: publish(celery_app, job_id, queue),
        validate=make_submit_validator(settings),
        worker_ttl_s=settings.worker_ttl_s, page_size_max=settings.page_size_max,
    )
    return Runtime(settings, engine, service)

"""Per-process worker state and the worker's background duties.

In each pool process: the job store, artifact store and pipeline runner (created lazily, after fork).
In the worker's main process: registration with capabilities and a heartbeat (``GET /v1/workers``),
and the reconciler that re-publishes queued jobs whose message was lost and running jobs whose
lease expired (the broker message is only a wake-up; the job row is the truth).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import socket
import threading

from celery import Celery, signals

from service.settings import get_settings
from service.store import ArtifactStore, JobStore, make_engine, migrate

from .broker import publish

log = logging.getLogger("kiln.worker")


def detect_capabilities() -> dict:
    """GPUs (name, ``sm<XY>``, memory) and the backends that really build here, from the compiler's
    ``build.capabilities``: a backend is listed only when its packages import (TensorRT / TensorRT-LLM
    only with a GPU) and the compiler ships its build module; the others come with the reason."""
    try:
        from service.compiler.build.capabilities import capabilities

        caps = capabilities()
    except Exception as exc:  # no compiler build package: a torch-only worker, said so
        log.warning("compiler capabilities unavailable (%s); advertising torch only", exc)
        return {"gpus": [], "backends": ["torch"], "unavailable": {}}
    gpus = [{"name": g["name"], "sm": f"sm{g['sm']}", "memory_bytes": g["memory_bytes"]} for g in caps.gpus]
    backends, unavailable = [], {}
    for b in caps.backends:
        module = f"service.compiler.build.backends.{b.name}_backend"
        if not b.available:
            unavailable[b.name] = b.reason or "not available"
        elif importlib.util.find_spec(module) is None:
            unavailable[b.name] = f"{b.name} imports here, but the compiler has no {module} yet"
        else:
            backends.append(b.name)
    return {"gpus": gpus, "backends": backends, "unavailable": unavailable,
            "versions": {b.name: b.version for b in caps.backends if b.version},
            "cuda_version": caps.cuda_version}


def worker_queues(settings, caps: dict) -> list[str]:
    queues = list(settings.queues)
    for gpu in caps["gpus"]:
        q = f"build.{gpu['sm']}"
        if q not in queues:
            queues.append(q)
    return queues


def unowned_grace_s(settings) -> float:
    """How long a temp entry without an owner in its name must stay unchanged before it is reclaimed."""
    return max(settings.lease_ttl_s * 2, 60.0)


class WorkerRuntime:
    def __init__(self, app: Celery):
        from .pipeline import PipelineRunner, load_stage_plugins
        from .webhooks import notify_job

        self.settings = get_settings()
        load_stage_plugins(self.settings)
        self.engine = make_engine(self.settings.db_url)
        migrate(self.engine)
        self.store = JobStore(self.engine)
        self.artifacts = ArtifactStore(self.settings.storage_root)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.runner = PipelineRunner(
            self.settings, self.store, self.artifacts, self.worker_id,
            enqueue=lambda job_id, queue, countdown: publish(app, job_id, queue, countdown),
            on_finished=lambda job_id: notify_job(self.settings, self.store, job_id),
        )


@functools.lru_cache(maxsize=1)
def worker_runtime(app: Celery) -> WorkerRuntime:
    """This pool process's runtime; ``app`` (the worker's Celery app) publishes retries."""
    return WorkerRuntime(app)


class MainProcessDuties:
    """Registration heartbeat + reconciler, on a daemon thread in the worker's main process."""

    def __init__(self, app: Celery, hostname: str, consuming: list[str] | None = None):
        self.settings = get_settings()
        self.engine = make_engine(self.settings.db_url)
        migrate(self.engine)
        self.store = JobStore(self.engine)
        self.artifacts = ArtifactStore(self.settings.storage_root)
        self.caps = detect_capabilities()
        # advertise exactly the queues this worker consumes (``-Q``), else the configured ones
        self.queues = consuming or worker_queues(self.settings, self.caps)
        self.worker_id = hostname
        self._publish = lambda job_id, queue: publish(app, job_id, queue)
        self._stop = threading.Event()

    def start(self) -> None:
        self.store.upsert_worker(self.worker_id, socket.gethostname(), self.queues, self.caps)
        self.reclaim_temps("worker start")
        threading.Thread(target=self._loop, name="kiln-worker-duties", daemon=True).start()

    def _loop(self) -> None:
        interval = min(self.settings.worker_heartbeat_s, self.settings.reconcile_interval_s)
        ticks = 0.0
        while not self._stop.wait(interval):
            ticks += interval
            try:
                self.store.upsert_worker(self.worker_id, socket.gethostname(), self.queues, self.caps)
                if ticks >= self.settings.reconcile_interval_s:
                    ticks = 0.0
                    self.reconcile()
            except Exception:
                log.warning("worker duties failed", exc_info=True)

    def reconcile(self) -> int:
        republished = 0
        for job_id, queue in self.store.stale_jobs(self.settings.requeue_after_s):
            job = self.store.get(job_id)
            if job is None or queue not in self.queues:
                continue
            if self.store.mark_requeued(job_id, expected_state=job.state):
                log.info("reconciler: re-publishing job %s (%s)", job_id, job.state)
                self._publish(job_id, queue)
                republished += 1
        self.reclaim_temps("reconciler")
        return republished

    def reclaim_temps(self, why: str):
        """Orphaned temporary outputs: those of leases that expired or ended (a crashed worker's), never a
        live lease's; unowned ones once unchanged for max(2 x lease TTL, 60 s)."""
        try:
            freed = self.artifacts.reclaim_temps(self.store.live_leases, unowned_older_than_s=unowned_grace_s(self.settings))
        except Exception:
            log.warning("%s: reclaiming temp outputs failed", why, exc_info=True)
            return None
        if freed.removed:
            log.info("%s: reclaimed %s", why, freed.line())
        return freed

    def stop(self) -> None:
        self._stop.set()
        try:
            self.store.remove_worker(self.worker_id)
        except Exception:
            log.warning("could not deregister worker %s", self.worker_id, exc_info=True)


_duties: MainProcessDuties | None = None


@signals.worker_ready.connect
def _on_worker_ready(sender=None, **_kw) -> None:
    global _duties
    consuming = None
    try:  # sender is the worker's Consumer
        consuming = sorted(sender.app.amqp.queues.consume_from)
    except AttributeError:
        pass
    hostname = getattr(sender, "hostname", None) or f"kiln@{socket.gethostname()}:{os.getpid()}"
    _duties = MainProcessDuties(sender.app, hostname, consuming)
    _duties.start()
    log.info("worker %s ready: queues=%s capabilities=%s", _duties.worker_id, _duties.queues, _duties.caps)


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_kw) -> None:
    if _duties is not None:
        _duties.stop()

"""The Celery app. One task, ``kiln.run_job``, that receives only a job id.

Run a worker with ``kiln worker`` (or ``celery -A service.workers.app worker -Q cpu -c 1``).
Reliability settings follow the reference: late ack + reject on worker lost (a SIGKILLed child's
message is redelivered), prefetch 1, JSON only, no result backend (the job row is the truth),
hard time limit below the broker's visibility timeout. The same code runs on the embedded
file-backed transport and on Redis; only ``KILN_BROKER_URL`` differs.
"""

from __future__ import annotations

import importlib
from typing import Any

from celery import Celery

from service.settings import Settings, get_settings

TASK_NAME = "kiln.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("kiln", broker=settings.broker, set_as_current=False)
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.uses_filesystem_broker:
        folder = settings.broker_folder
        for sub in ("queue", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport.update(data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
                         control_folder=str(folder / "control"), processed_folder=str(folder / "processed"),
                         store_processed=False, polling_interval=0.2)
    if settings.task_time_limit_s >= settings.visibility_timeout_s:
        raise ValueError("KILN_TASK_TIME_LIMIT_S must stay below KILN_VISIBILITY_TIMEOUT_S")
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 60),
        broker_transport_options=transport,
        visibility_timeout=settings.visibility_timeout_s,
        task_default_queue="cpu",
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.uses_filesystem_broker,
    )
    return app


app = make_celery(get_settings())


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    from .runtime import worker_runtime

    return worker_runtime().runner.run(job_id)


def load_stage_plugins(settings: Settings) -> None:
    importlib.import_module("service.workers.stages")
    importlib.import_module("service.workers.compile_stages")  # quantize, build, evaluate
    for name in filter(None, (m.strip() for m in settings.stage_plugins.split(","))):
        importlib.import_module(name)


def publish(celery_app: Celery, job_id: str, queue: str, countdown: float = 0.0) -> None:
    """Send the wake-up message. Only the job id travels; the spec and any token stay out of the broker."""
    celery_app.send_task(TASK_NAME, args=[job_id], queue=queue, countdown=countdown or None)


from . import runtime as _runtime  # noqa: E402,F401  (connects the worker signals)

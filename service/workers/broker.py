"""The Celery configuration and the wake-up message, for the worker (``app.py``) and the API alike.

Reliability settings follow the reference: late ack + reject on worker lost (a SIGKILLed child's
message is redelivered), prefetch 1, JSON only, no result backend (the job row is the truth),
hard time limit below the broker's visibility timeout, the soft one min(60 s, 10%) before it
(``Settings.soft_time_limit_s``; ``Settings.check_reliability`` refuses limits that cannot work). The same code runs on the embedded
file-backed transport and on Redis; only ``KILN_BROKER_URL`` differs.

Redis redelivery: kombu keeps a delivered, unacknowledged message in the ``unacked`` hash (scored by its
delivery time in ``unacked_index``) and puts it back on its queue only when a live consumer runs
``QoS.restore_visible`` and finds it older than the visibility timeout. kombu 5.7 runs that from a timer
every ``unacked_restore_interval`` (10 s) but scans only on every ``unacked_restore_throttle``-th call (10),
so a dead worker's message came back up to ~100 s after its timeout (137 s past delivery with a 75 s
timeout, in issue 19). Here the throttle is 1 and the interval ``KILN_BROKER_RESTORE_INTERVAL_S``, so it
comes back within visibility timeout + interval (+ ``KILN_BROKER_RESTORE_MUTEX_S`` if a consumer died
holding the scan's mutex). The job itself does not wait for that: its row is the truth, and the
reconciler re-publishes it once its lease expires; the restored message then finds the job claimed or
finished and is acknowledged without running it (``PipelineRunner.run`` -> "skipped").
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.settings import Settings

TASK_NAME = "kiln.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("kiln", broker=settings.broker, set_as_current=False)
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.broker.startswith(("redis://", "rediss://")):
        transport.update(unacked_restore_interval=settings.broker_restore_interval_s, unacked_restore_throttle=1,
                         unacked_mutex_expire=settings.broker_restore_mutex_s)
    if settings.uses_filesystem_broker:
        folder = settings.broker_folder
        for sub in ("queue", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport.update(data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
                         control_folder=str(folder / "control"), processed_folder=str(folder / "processed"),
                         store_processed=False, polling_interval=0.2)
    settings.check_reliability()  # InvalidConfiguration (a ValueError) for limits that cannot work
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
        task_soft_time_limit=settings.soft_time_limit_s,
        broker_transport_options=transport,
        visibility_timeout=settings.visibility_timeout_s,
        task_default_queue="cpu",
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.uses_filesystem_broker,
        # prefork, with the repair of a task pipe lock a SIGKILLed idle child took with it (pool.py)
        worker_pool="service.workers.pool:KilnTaskPool",
    )
    return app


def publish(celery_app: Celery, job_id: str, queue: str, countdown: float = 0.0) -> None:
    """Send the wake-up message. Only the job id travels; the spec and any token stay out of the broker."""
    celery_app.send_task(TASK_NAME, args=[job_id], queue=queue, countdown=countdown or None)

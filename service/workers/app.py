"""The Celery app. One task, ``kiln.run_job``, that receives only a job id.

Run a worker with ``kiln worker`` (or ``celery -A service.workers.app worker -Q cpu -c 1``). The
configuration and the wake-up message are in ``broker.py``; the per-process state and the worker's
background duties in ``runtime.py`` (imported here, which connects the worker signals).
"""

from __future__ import annotations

from service.settings import get_settings

from . import runtime
from .broker import TASK_NAME, make_celery

app = make_celery(get_settings())


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    return runtime.worker_runtime(app).runner.run(job_id)

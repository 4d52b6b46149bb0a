"""A Celery app built by Kiln's ``make_celery`` (so it carries Kiln's Redis transport options) for
``test_chaos.py``'s redelivery test: its ``kiln.run_job`` task appends "<worker pid> <job id>" to
``$KILN_TEST_RECORD`` and sleeps ``$KILN_TEST_SLEEP_S`` (long in the worker that gets SIGKILLed).

The visibility timeout is shortened here (``$KILN_TEST_VISIBILITY_S``) below what Kiln's settings allow
(the task time limit must stay under it, and be at least 30 s), so that the test takes seconds; the restore
interval and throttle under test are Kiln's own.
"""

from __future__ import annotations

import os
import time

from service.settings import Settings
from service.workers.broker import TASK_NAME, make_celery

app = make_celery(Settings())
app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                     "visibility_timeout": int(os.environ["KILN_TEST_VISIBILITY_S"])}


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    with open(os.environ["KILN_TEST_RECORD"], "a") as fh:
        fh.write(f"{os.getpid()} {job_id} {time.time()}\n")
    time.sleep(float(os.environ.get("KILN_TEST_SLEEP_S", "0")))
    return "done"

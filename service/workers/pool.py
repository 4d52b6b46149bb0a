"""Celery's prefork pool, with one repair for pool children killed while they wait for work.

Under Celery's synchronous consumer loop (a transport without an event loop: the embedded file broker)
the prefork pool is billiard's blocking ``Pool``. Its children share one task pipe guarded by a
process-shared read lock, and an idle child waits for its next task *inside* that lock (``SimpleQueue.
get_payload``: ``with self._rlock: recv_bytes()``). A child SIGKILLed there (the OOM killer, an operator,
chaos scenario 1) takes the lock with it: the replacement child blocks on it forever, every later task
stays in the pipe, and jobs stay ``queued`` while the worker looks alive (seen in ``benchmarks/chaos.py
--scenario kill``: the pool child killed between two jobs). The result pipe's write lock has the same
hazard for a child killed while it sends a result.

``KilnBlockingPool`` frees such a lock when a child has died by a signal and no other child is alive:
then no live process can be holding it legitimately (the parent takes neither lock while it runs). With
``--concurrency`` above 1 a live sibling may hold the read lock honestly and nothing is released; Kiln's
workers run one job at a time by default. Redis and AMQP workers use Celery's asynchronous pool (a pipe
per child, no shared locks) and are not affected.
"""

from __future__ import annotations

import logging

from billiard.pool import Pool
from celery.concurrency.prefork import TaskPool

log = logging.getLogger("kiln.worker")


def free_stale_locks(pool: Pool, dead) -> list[str]:
    """Release the task pipe's read lock and the result pipe's write lock when ``dead`` (a child that
    died by a signal) may have held them and no other child is alive. Returns the locks released."""
    if dead.exitcode is None or dead.exitcode >= 0:
        return []  # a clean exit runs its ``with lock:`` blocks to the end
    if any(w is not dead and w.exitcode is None for w in pool._pool):
        return []
    released = []
    for name, queue, attr in (("task pipe read lock", pool._inqueue, "_rlock"),
                              ("result pipe write lock", pool._outqueue, "_wlock")):
        lock = getattr(queue, attr, None)
        if lock is None:
            continue
        if lock.acquire(False):  # free: nothing to repair
            lock.release()
            continue
        lock.release()  # held, and no process that could still release it is alive
        released.append(name)
    return released


class KilnBlockingPool(Pool):
    def process_flush_queues(self, worker) -> None:
        super().process_flush_queues(worker)
        released = free_stale_locks(self, worker)
        if released:
            log.warning("pool child %s died by signal %s holding the %s; released for its replacement",
                        worker.pid, -worker.exitcode, " and the ".join(released))


class KilnTaskPool(TaskPool):
    """``worker_pool`` of Kiln's Celery app: the prefork pool with ``KilnBlockingPool``."""

    BlockingPool = KilnBlockingPool

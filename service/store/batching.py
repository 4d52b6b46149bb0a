"""Coalesced reads: concurrent async callers asking for rows by key share one batched query.

A status poll is a one-row primary-key read. Run synchronously on the event loop it blocks the loop
for a whole database round trip (on PostgreSQL the server process competes for the same cores), so
one API process serves at most one poll per round trip. Here the read is either awaited (an async
driver: the loop serves other requests meanwhile) or runs on a small thread pool, and every request
that arrives while a read is in flight waits for the *next* read, which fetches all of their keys at
once (``WHERE id IN (...)``). Under light load each batch holds one key; under heavy load the batches
grow and the number of round trips per second stays bounded.

Freshness is that of an unbatched read: a caller's key is only ever served by a query that started
after the caller asked, so it sees every change committed before its request arrived.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _LoopState:
    __slots__ = ("pending", "running", "tasks")

    def __init__(self) -> None:
        self.pending: dict = {}  # key -> [futures], in arrival order
        self.running = 0
        self.tasks: set[asyncio.Task] = set()  # strong references to the drain tasks


class Coalescer(Generic[K, V]):
    """``await get(key)`` returns ``fetch([keys])[key]`` (or None), with concurrent calls batched.

    At most ``concurrency`` fetches run at a time per event loop, each with at most ``max_batch``
    distinct keys. A coroutine function ``fetch`` is awaited on the loop; a plain one runs on this
    object's own threads (never on the loop). An exception from ``fetch`` is raised to every caller
    of that batch.
    """

    def __init__(self, fetch: Callable[[Sequence[K]], dict[K, V] | Awaitable[dict[K, V]]], *, max_batch: int = 200,
                 concurrency: int = 2, name: str = "kiln-read"):
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be >= 1")
        self._fetch = fetch
        self.max_batch = max_batch
        self.concurrency = concurrency
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        # per event loop (the API has one; tests may run several in turn)
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    async def get(self, key: K) -> V | None:
        if self._closed:
            raise RuntimeError("coalescer is closed")
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState()
        future = loop.create_future()
        state.pending.setdefault(key, []).append(future)
        if state.running < self.concurrency:
            state.running += 1
            task = loop.create_task(self._drain(loop, state))
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)
        return await future

    async def _drain(self, loop: asyncio.AbstractEventLoop, state: _LoopState) -> None:
        try:
            while state.pending:
                batch: dict = {}
                for key in list(state.pending)[: self.max_batch]:
                    waiters = [f for f in state.pending.pop(key) if not f.done()]  # done: the caller went away
                    if waiters:
                        batch[key] = waiters
                if not batch:
                    continue
                try:
                    if inspect.iscoroutinefunction(fetch := self._fetch):
                        rows = await fetch(list(batch))
                    else:
                        rows = await loop.run_in_executor(self._pool(), fetch, list(batch))
                except Exception as exc:
                    for waiters in batch.values():
                        for f in waiters:
                            if not f.done():
                                f.set_exception(exc)
                    continue
                except BaseException:  # cancelled (loop shutting down): release the callers, then stop
                    for waiters in batch.values():
                        for f in waiters:
                            f.cancel()
                    raise
                for key, waiters in batch.items():
                    row = rows.get(key)
                    for f in waiters:
                        if not f.done():
                            f.set_result(row)
        finally:
            state.running -= 1
            if state.running == 0:  # nobody left to serve these: fail them instead of leaving them hanging
                for waiters in state.pending.values():
                    for f in waiters:
                        f.cancel()
                state.pending.clear()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("coalescer is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=self._name)
            return self._executor

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

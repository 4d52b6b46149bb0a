"""PostgreSQL reads awaited on the event loop (psycopg's async connections), for the status-poll path.

Why not the SQLAlchemy engine from a thread: every batch would then cost a thread hand-off, during
which the poll thread and the event loop fight over the GIL, plus SQLAlchemy's per-execution
machinery (more CPU than the query itself). Here one read is one prepared statement sent from the
loop; while it is in flight the loop serves other requests.

The connections are the API process's own (at most ``concurrency`` per event loop, beside the
engine's pool), in autocommit: each read is a single statement, so it sees everything committed
before it started. A connection older than ``max_age_s`` is replaced; one that the server dropped
(restart, failover, idle kill) is replaced and the read retried once.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
from sqlalchemy.engine import URL


def conninfo_from_url(url: URL) -> str:
    """libpq connection URI for a SQLAlchemy ``postgresql+psycopg://`` URL (same host, user, options)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncPgReader:
    """``await reader.read(keys)``: run ``sql`` (one ``%(ids)s`` array parameter) and return
    ``{row[0]: convert(row as a column-name mapping)}``."""

    def __init__(self, conninfo: str, sql: str, convert: Callable[[Mapping[str, Any]], Any], *,
                 concurrency: int = 2, max_age_s: float = 60.0, connect_timeout_s: int = 10):
        self._conninfo = conninfo
        self._sql = sql
        self._convert = convert
        self.concurrency = concurrency
        self.max_age_s = max_age_s
        self.connect_timeout_s = connect_timeout_s
        # idle connections per event loop (an async connection belongs to the loop that opened it)
        self._idle: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[psycopg.AsyncConnection]] = \
            weakref.WeakKeyDictionary()
        # every open connection -> (when it is due for replacement, its loop)
        self._open: dict[psycopg.AsyncConnection, tuple[float, weakref.ref]] = {}
        self._lock = threading.Lock()
        self._closed = False

    async def read(self, keys: Sequence[str]) -> dict[str, Any]:
        for attempt in (1, 2):
            conn = await self._acquire()
            try:
                cur = await conn.execute(self._sql, {"ids": list(keys)}, prepare=True)
                rows = await cur.fetchall()
                assert cur.description is not None  # a SELECT (fetchall raises on anything else)
                names = [c.name for c in cur.description]
            except psycopg.OperationalError:
                dropped = conn.closed  # the server went away (restart, idle kill), not a query error
                self._discard(conn)
                if attempt == 2 or not dropped:  # only a dropped connection is worth a second try
                    raise
                continue
            except BaseException:  # cancelled mid-read, or anything unexpected: the session state is unknown
                self._discard(conn)
                raise
            self._release(conn)
            return {row[0]: self._convert(dict(zip(names, row, strict=True))) for row in rows}
        raise AssertionError("unreachable")

    async def _acquire(self) -> psycopg.AsyncConnection:
        if self._closed:
            raise RuntimeError("reader is closed")
        loop = asyncio.get_running_loop()
        idle = self._idle.get(loop)
        if idle is None:  # a new loop (tests run several in turn): close what earlier, closed loops left
            idle = self._idle[loop] = []
            self._discard_orphans()
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed or now > self._open.get(conn, (0.0, None))[0]:
                self._discard(conn)
                continue
            return conn
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True,
                                                     connect_timeout=self.connect_timeout_s)
        with self._lock:
            self._open[conn] = (now + self.max_age_s, weakref.ref(loop))
        if self._closed:  # closed while connecting
            self._discard(conn)
            raise RuntimeError("reader is closed")
        return conn

    def _release(self, conn: psycopg.AsyncConnection) -> None:
        idle = self._idle.setdefault(asyncio.get_running_loop(), [])
        if self._closed or len(idle) >= self.concurrency:
            self._discard(conn)
        else:
            idle.append(conn)

    def _discard(self, conn: psycopg.AsyncConnection) -> None:
        with self._lock:
            self._open.pop(conn, None)
        _close_now(conn)

    def _discard_orphans(self) -> None:
        with self._lock:
            orphans = [c for c, (_, ref) in self._open.items() if (lp := ref()) is None or lp.is_closed()]
        for conn in orphans:
            self._discard(conn)

    def close(self) -> None:
        """Close every connection (callable from any thread, with or without a running loop)."""
        with self._lock:
            self._closed = True
            conns, self._open = list(self._open), {}
        for conn in conns:
            _close_now(conn)


def _close_now(conn: psycopg.AsyncConnection) -> None:
    # AsyncConnection.close() awaits nothing when the connection has no pool; ending the libpq
    # connection directly lets close() run from synchronous code (shutdown) as well.
    if not conn.closed:
        conn.pgconn.finish()

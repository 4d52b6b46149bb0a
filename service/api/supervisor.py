"""The embedded worker's supervisor: ``kiln serve`` keeps one worker process alive.

The worker runs as a subprocess in its own session (so a SIGKILL of its process group takes the
Celery main process and its pool child together). When it exits while the server is still up, the
supervisor logs the death (exit code or signal), removes the dead worker's registration so
``GET /v1/workers`` stops listing it, and starts a new one after an exponential backoff
(``KILN_WORKER_RESTART_BACKOFF_S`` doubling up to ``KILN_WORKER_RESTART_BACKOFF_MAX_S``; the delay
starts over once a worker stayed up for ``KILN_WORKER_STABLE_S``). ``status()`` is what
``/v1/workers`` and ``/readyz`` report: state (starting, running, restarting, stopped), pid, restarts,
last exit code and time, next restart time.

The job a killed worker held is not lost: its lease expires and the reconciler of the new worker
re-publishes it (the job row is the truth; see ``service/workers/runtime.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("kiln.supervisor")


def _die_with_parent() -> None:
    """Linux: the embedded worker gets SIGTERM if `kiln serve` dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class WorkerSupervisor:
    """Start, watch and respawn one worker subprocess. Thread-safe ``status()``."""

    def __init__(self, argv: list[str], env: dict, *, backoff_s: float = 1.0, backoff_max_s: float = 60.0,
                 stable_s: float = 60.0, on_exit: Callable[[int], None] | None = None, poll_s: float = 0.2):
        self.argv, self.env = argv, env
        self.backoff_s, self.backoff_max_s, self.stable_s = max(0.0, backoff_s), max(backoff_s, backoff_max_s), stable_s
        self.on_exit = on_exit  # called with the dead worker's pid (deregistration)
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._state = "stopped"
        self._restarts = 0
        self._failures_in_a_row = 0
        self._started_at: float | None = None
        self._last_exit_code: int | None = None
        self._last_exit_at: float | None = None
        self._next_restart_at: float | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="kiln-worker-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        with self._lock:
            self._proc, self._started_at, self._next_restart_at = proc, time.time(), None
            self._state = "running"
        log.info("embedded worker started (pid %d)", proc.pid)
        print(f"kiln: worker started (pid {proc.pid})", file=sys.stderr, flush=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            proc = self._proc
            assert proc is not None
            code = proc.poll()
            if code is None:
                self._stop.wait(self.poll_s)
                continue
            if self._stop.is_set():
                break
            now = time.time()
            up = now - (self._started_at or now)
            if up >= self.stable_s:
                self._failures_in_a_row = 0
            delay = self.backoff_delay(self._failures_in_a_row)
            self._failures_in_a_row += 1
            with self._lock:
                self._state, self._last_exit_code, self._last_exit_at = "restarting", code, now
                self._next_restart_at = now + delay
            msg = (f"kiln: worker pid {proc.pid} died ({describe_exit(code)}) after {up:.1f}s; "
                   f"restarting in {delay:.1f}s (restart #{self._restarts + 1})")
            log.warning(msg)
            print(msg, file=sys.stderr, flush=True)
            if self.on_exit is not None:
                try:
                    self.on_exit(proc.pid)
                except Exception:
                    log.warning("could not deregister dead worker %d", proc.pid, exc_info=True)
            if self._stop.wait(delay):
                break
            try:
                self._spawn()
            except OSError as exc:  # e.g. out of processes: try again after the next backoff
                log.error("could not start the worker: %s", exc)
                with self._lock:
                    self._started_at = time.time()
                continue
            with self._lock:
                self._restarts += 1

    def backoff_delay(self, failures_in_a_row: int) -> float:
        """Seconds before the next start after ``failures_in_a_row`` earlier quick deaths: doubling, capped."""
        return min(self.backoff_max_s, self.backoff_s * (2 ** min(failures_in_a_row, 32)))

    def stop(self, timeout: float = 30.0) -> None:
        """No more respawns; SIGTERM the worker's group (warm shutdown), SIGKILL after ``timeout``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        proc = self._proc
        with self._lock:
            self._state = "stopped"
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    # -- reporting --------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def status(self) -> dict:
        with self._lock:
            proc = self._proc
            return {
                "state": self._state,
                "pid": proc.pid if proc is not None and self._state == "running" else None,
                "restarts": self._restarts,
                "started_at": self._started_at,
                "last_exit_code": self._last_exit_code,
                "last_exit": describe_exit(self._last_exit_code) if self._last_exit_at is not None else None,
                "last_exit_at": self._last_exit_at,
                "next_restart_at": self._next_restart_at,
            }

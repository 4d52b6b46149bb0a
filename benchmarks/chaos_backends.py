"""Private Redis and PostgreSQL servers for the chaos scenarios that restart them (``benchmarks/chaos.py``).

The scenarios never touch the shared servers on :6379 / :5432 (other test runs use them): each starts
its own ``redis-server`` (AOF on) and its own PostgreSQL cluster (``initdb`` into a temp dir, trust auth,
a free port, its socket in the temp dir) and stops and removes them at the end. ``missing()`` says which
binary is absent, so a test can skip with that reason.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    return shutil.which(name)


def missing() -> list[str]:
    """The binaries the private servers need that this machine lacks."""
    need = {"redis-server": shutil.which("redis-server"), "initdb": _pg_bin("initdb"), "pg_ctl": _pg_bin("pg_ctl")}
    return [name for name, path in need.items() if path is None]


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PrivateRedis:
    """``redis-server`` on a free port with its AOF (``appendfsync everysec``) in a temp dir."""

    def __init__(self, work: Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="kiln-redis-", dir=work))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: _answers(self.port), 20, "private redis-server")
        return self

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits (what a restart by an operator or an orchestrator does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self, down_s: float = 2.0) -> float:
        """Stop, stay away ``down_s``, start on the same port and AOF. Returns the seconds it was away."""
        t0 = time.monotonic()
        self.stop()
        time.sleep(down_s)
        self.start()
        return time.monotonic() - t0

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (``initdb``, trust auth, a free port), run as the ``postgres`` user when
    this process is root (the server refuses to run as root)."""

    def __init__(self, work: Path | None = None):
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        # as root, the postgres user must reach the folder: a fresh one under the temp root, not the (0700) work dir
        self.dir = Path(tempfile.mkdtemp(prefix="kiln-pg-", dir=None if self._as else work))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def _run(self, *cmd) -> None:
        done = subprocess.run([*self._as, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}): {done.stderr.strip()[-500:]}")

    def start(self) -> PrivatePostgres:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "pg.log"), "-o", opts, "-w", "start")
        _wait(lambda: _answers(self.port), 30, "private PostgreSQL")
        return self

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: clients are disconnected, as in a failover or a restart for an upgrade."""
        if (self.data / "postmaster.pid").exists():
            self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self, down_s: float = 5.0) -> float:
        t0 = time.monotonic()
        self.stop()
        time.sleep(down_s)
        self.start()
        return time.monotonic() - t0

    def close(self) -> None:
        try:
            self.stop()
        except (subprocess.SubprocessError, OSError, RuntimeError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

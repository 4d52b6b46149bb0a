"""Start real Kiln processes (Celery workers, the API server) for tests, and wait on conditions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def service_env(storage: Path, *, database_url: str | None = None, broker_url: str | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update({
        "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "KILN_STORAGE": str(storage),
        "KILN_LEASE_TTL_S": "3", "KILN_HEARTBEAT_S": "0.5", "KILN_RECONCILE_INTERVAL_S": "1",
        "KILN_WORKER_HEARTBEAT_S": "1", "KILN_STAGE_PLUGINS": "tests.service.slow_stage",
        "KILN_TASK_TIME_LIMIT_S": "600", "KILN_VISIBILITY_TIMEOUT_S": "900",
    })
    if database_url:
        env["KILN_DATABASE_URL"] = database_url
    if broker_url:
        env["KILN_BROKER_URL"] = broker_url
    env.update({k: str(v) for k, v in extra.items()})
    return env


def settings_from(env: dict):
    from service.settings import Settings

    saved = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith("KILN_")})
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_worker(env: dict, log: Path, name: str = "w1") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "celery", "-A", "service.workers.app", "worker", "-Q", "cpu", "-c", "1",
           "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, grace: float = 20.0) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        kill_group(proc, signal.SIGTERM, grace=8.0)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, log: Path, http_port: int, grpc_port: int = -1, *, worker: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(http_port), "--grpc-port", str(grpc_port)]
    if not worker:
        cmd.append("--no-worker")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_http(url: str, timeout: float = 60.0, predicate=None):
    import httpx

    def ok():
        try:
            r = httpx.get(url, timeout=2)
        except httpx.HTTPError:
            return None
        if r.status_code == 200 and (predicate is None or predicate(r.json())):
            return r
        return None

    return wait_for(ok, timeout, 0.2, url)

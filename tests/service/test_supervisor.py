"""`kiln serve` supervises its embedded worker: a dead worker is respawned (with backoff), logged, and
reported in /v1/workers and /readyz; jobs submitted after the death still run."""

from __future__ import annotations

import os
import signal
import sys

import httpx

from service.api.supervisor import WorkerSupervisor

from .conftest import TINY_REPO, install_in_hf_cache
from .harness import free_port, service_env, start_server, stop, wait_for, wait_http


def test_backoff_doubles_and_is_capped():
    sup = WorkerSupervisor(["true"], {}, backoff_s=0.5, backoff_max_s=5.0)
    assert [sup.backoff_delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert sup.backoff_delay(10_000) == 5.0


def test_a_process_that_keeps_dying_is_respawned_until_stopped():
    sup = WorkerSupervisor([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                           backoff_s=0.01, backoff_max_s=0.05, poll_s=0.01)
    sup.start()
    try:
        wait_for(lambda: sup.status()["restarts"] >= 3, 60, 0.01, "three respawns")
        status = sup.status()
        assert status["last_exit_code"] == 3 and status["last_exit"] == "exit code 3"
    finally:
        sup.stop()
    after = sup.status()
    assert after["state"] == "stopped"
    assert sup._proc.poll() is not None  # nothing left running


def test_serve_respawns_a_sigkilled_worker_and_runs_jobs_afterwards(tmp_path, tiny_model_dir):
    env = service_env(tmp_path / "storage", KILN_WORKER_RESTART_BACKOFF_S="0.5")
    install_in_hf_cache(tiny_model_dir, tmp_path / "storage" / "hf-cache", TINY_REPO)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_server(env, log, port)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            first = wait_http(f"{base}/v1/workers", 120, lambda b: b["workers"]).json()
        except TimeoutError:
            raise AssertionError(log.read_text()[-3000:]) from None
        embedded = first["embedded_worker"]
        assert embedded["state"] == "running" and embedded["restarts"] == 0
        old_pid = embedded["pid"]
        assert [w["id"] for w in first["workers"]][0].startswith(f"kiln-{old_pid}@")

        os.killpg(old_pid, signal.SIGKILL)  # the worker's main process and its pool child

        def respawned(body):
            e = body["embedded_worker"]
            return (e["restarts"] == 1 and e["state"] == "running" and body["workers"]
                    and all(not w["id"].startswith(f"kiln-{old_pid}@") for w in body["workers"]))

        try:
            after = wait_http(f"{base}/v1/workers", 120, respawned).json()
        except TimeoutError:
            raise AssertionError(log.read_text()[-3000:]) from None
        e = after["embedded_worker"]
        assert e["pid"] != old_pid and e["last_exit_code"] == -signal.SIGKILL
        assert e["last_exit"] == "killed by SIGKILL"
        assert after["workers"][0]["id"].startswith(f"kiln-{e['pid']}@")
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["status"] == "ready" and ready["embedded_worker"]["restarts"] == 1
        assert f"worker pid {old_pid} died (killed by SIGKILL)" in log.read_text()

        job = httpx.post(f"{base}/v1/jobs", json={"model": TINY_REPO, "dtype": "float16"}).json()
        done = wait_for(lambda: (j := httpx.get(f"{base}/v1/jobs/{job['id']}").json())["state"]
                        in ("succeeded", "failed", "cancelled") and j, 120, 0.2, "job after the respawn")
        assert done["state"] == "succeeded", (done["error"], log.read_text()[-3000:])
    finally:
        stop(proc)

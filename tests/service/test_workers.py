"""Real Celery workers (subprocesses): the embedded default (file transport + SQLite) and the scaled
deployment (the real Redis + the running PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from service.domain import JobService, JobSpec
from service.store import ArtifactStore, JobStore, make_engine, migrate, sha256_file
from service.workers.broker import make_celery, publish

from .conftest import REDIS_HOST, REDIS_PORT, TINY_REPO, PgDatabase, install_in_hf_cache, reachable
from .harness import kill_group, service_env, settings_from, start_worker, stop, wait_for

REDIS_DB = 11


@pytest.fixture(params=["filesystem+sqlite", "redis+postgresql"])
def broker_url(request):
    if request.param.startswith("filesystem"):
        yield None
        return
    if not reachable(REDIS_HOST, REDIS_PORT):
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    client.flushdb()


@pytest.fixture
def database_url(broker_url):
    if broker_url is None:
        yield None  # SQLite under the storage root
        return
    if not reachable("127.0.0.1", 5432):
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    db = PgDatabase()
    yield db.url
    db.close()


@pytest.fixture
def cluster(tmp_path, broker_url, database_url, tiny_model_dir):
    """A storage root with the tiny model in its HF cache, a job store and a way to start workers."""
    env = service_env(tmp_path / "storage", broker_url=broker_url, database_url=database_url)
    settings = settings_from(env)
    install_in_hf_cache(tiny_model_dir, settings.hf_cache, TINY_REPO)
    engine = make_engine(settings.db_url)
    migrate(engine)
    store = JobStore(engine)
    celery_app = make_celery(settings)
    service = JobService(store, ArtifactStore(settings.storage_root),
                         enqueue=lambda job_id, queue: publish(celery_app, job_id, queue))
    procs = []

    class Cluster:
        def worker(self, name="w1"):
            proc = start_worker(env, tmp_path / f"{name}.log", name)
            procs.append(proc)
            wait_for(lambda: any(w["id"].startswith(name + "@") for w in store.live_workers(60)), 60, what="worker registration")
            return proc

        def log(self, name="w1"):
            return (tmp_path / f"{name}.log").read_text(errors="replace")[-4000:]

    c = Cluster()
    c.env, c.settings, c.store, c.service = env, settings, store, service
    yield c
    for p in procs:
        stop(p)
    engine.dispose()


def _finished(store: JobStore, job_id: str):
    job = store.get(job_id)
    return job if job.terminal else None


def test_worker_runs_a_job_and_resubmission_hits_the_cache(cluster):
    cluster.worker()
    job, _ = cluster.service.submit("t", JobSpec(model=TINY_REPO, dtype="float16"))
    done = wait_for(lambda: _finished(cluster.store, job.id), 60, what="job to finish")
    assert done.state == "succeeded", (done.error, cluster.log())
    assert [a.name for a in done.artifacts] == ["checkpoint"]
    assert [s.name for s in done.stages] == ["fetch", "convert", "publish"]
    assert not any(s.cache_hit for s in done.stages)
    again, created = cluster.service.submit("t", JobSpec(model=TINY_REPO, dtype="float16"))
    assert created
    done2 = wait_for(lambda: _finished(cluster.store, again.id), 60, what="second job")
    assert done2.state == "succeeded"
    assert {s.name: s.cache_hit for s in done2.stages}["convert"] is True
    assert done2.artifacts[0].key == done.artifacts[0].key


def test_worker_sigkilled_mid_stage_job_completes_once(cluster):
    worker = cluster.worker("w1")
    job, _ = cluster.service.submit("t", JobSpec(model=TINY_REPO, labels={"slow": "4"}))
    wait_for(lambda: (j := cluster.store.get(job.id)).stage == "slow" and j.progress > 0.6, 60, 0.05, "slow stage")
    slow_root = cluster.settings.storage_root / "stages" / "slow"
    kill_group(worker)  # SIGKILL the whole worker: main process and pool child
    assert [p.name for p in slow_root.iterdir() if not p.name.startswith(".")] == []  # nothing half-written is visible
    cluster.worker("w2")
    done = wait_for(lambda: _finished(cluster.store, job.id), 90, what="job to finish after the kill")
    assert done.state == "succeeded", (done.error, cluster.log("w2"))
    assert done.attempts == 2
    stages = {s.name: s for s in done.stages}
    assert stages["convert"].cache_hit is True and stages["slow"].cache_hit is False  # resumed at the unfinished stage
    # exactly one artifact, complete and matching its manifest; no partial output under any key
    assert [a.name for a in done.artifacts] == ["checkpoint"]
    for stage in ("convert", "slow"):
        keys = [p for p in (cluster.settings.storage_root / "stages" / stage).iterdir() if not p.name.startswith(".")]
        assert len(keys) == 1
        manifest = json.loads((keys[0] / "manifest.json").read_text())
        for f in manifest["files"]:
            assert sha256_file(keys[0] / f["path"]) == f["sha256"]
    assert (slow_root / stages["slow"].key / "payload.bin").read_bytes() == b"a" * 4096 + b"b" * 4096


def _pool_children(pid: int) -> set[int]:
    """Children of every thread of the worker's main process (billiard forks replacements from a thread)."""
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def test_idle_pool_child_sigkilled_between_jobs_does_not_wedge_the_worker(cluster):
    """An idle pool child waits for work inside the task pipe's shared read lock (billiard's blocking pool,
    the embedded file broker's); SIGKILLed there it took the lock along and the replacement child waited on
    it forever: the next jobs stayed queued (chaos scenario 1, 2026-12-03). Three kills in a row, each
    followed by a job that must run."""
    worker = cluster.worker("w1")
    for i in range(3):
        before = wait_for(lambda: _pool_children(worker.pid) or None, 30, 0.1, "a pool child")
        time.sleep(0.5)  # idle: blocked reading the task pipe
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda b=before: (_pool_children(worker.pid) - b) or None, 30, 0.1, "the replacement child")
        job, _ = cluster.service.submit("t", JobSpec(model=TINY_REPO, dtype="float16", labels={"i": str(i)}))
        done = wait_for(lambda j=job: _finished(cluster.store, j.id), 60, what=f"job {i} after killing the idle child")
        assert done.state == "succeeded", (done.error, cluster.log())
        assert done.attempts == 1
    if cluster.settings.uses_filesystem_broker:  # the blocking pool: the repair says what it released
        assert "holding the task pipe read lock; released for its replacement" in cluster.log()


def _temp_entries(root):
    return sorted(p.relative_to(root).as_posix() for p in root.glob("stages/*/.*"))


def test_worker_sigkilled_mid_convert_leaves_no_temp_dirs(cluster):
    """The compiler's half-written output (``stages/convert/..tmp-<…>.tmp-<…>``) of a SIGKILLed attempt is
    reclaimed when the next attempt takes the job over: none is left once the retry succeeded."""
    root = cluster.settings.storage_root
    worker = cluster.worker("w1")
    job, _ = cluster.service.submit("t", JobSpec(model=TINY_REPO, dtype="float32", labels={"slowconvert": "0.3"}))
    wait_for(lambda: (j := cluster.store.get(job.id)).stage == "convert" and j.progress > 0.3, 60, 0.05, "mid-convert")
    kill_group(worker)
    leaked = _temp_entries(root)
    assert any(name.startswith("stages/convert/..tmp-") for name in leaked), leaked  # the compiler's temp dir
    cluster.worker("w2")
    done = wait_for(lambda: _finished(cluster.store, job.id), 120, what="job to finish after the kill")
    assert done.state == "succeeded", (done.error, cluster.log("w2"))
    assert done.attempts == 2
    assert _temp_entries(root) == []


def test_running_job_is_cancelled_by_request(cluster):
    cluster.worker()
    job, _ = cluster.service.submit("t", JobSpec(model=TINY_REPO, labels={"slow": "20"}))
    wait_for(lambda: cluster.store.get(job.id).stage == "slow", 60, 0.05, "slow stage")
    cluster.service.cancel("t", job.id)
    done = wait_for(lambda: _finished(cluster.store, job.id), 30, what="cancellation")
    assert done.state == "cancelled"
    assert done.artifacts == []

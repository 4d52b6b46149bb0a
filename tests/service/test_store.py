"""Job store on SQLite and the running PostgreSQL; artifact store atomic publish and path safety."""

from __future__ import annotations

import time

import pytest

from service.domain import JobService, JobSpec
from service.domain.errors import IdempotencyConflict, JobFinished, JobNotFound, NoWorker
from service.store import ArtifactStore, UnsafePath, safe_relpath


def _spec(**kw) -> JobSpec:
    return JobSpec(model="org/model", **kw)


def test_idempotency_key_returns_the_same_job(job_store):
    a, created_a = job_store.create(tenant="t1", spec=_spec(), idempotency_key="k1", queue="cpu")
    b, created_b = job_store.create(tenant="t1", spec=_spec(), idempotency_key="k1", queue="cpu")
    c, created_c = job_store.create(tenant="t2", spec=_spec(), idempotency_key="k1", queue="cpu")
    assert (created_a, created_b, created_c) == (True, False, True)
    assert a.id == b.id != c.id


def test_list_filters_by_state_and_label_with_cursor_pagination(job_store):
    ids = []
    for i in range(7):
        job, _ = job_store.create(tenant="t", spec=_spec(labels={"team": "a" if i % 2 else "b"}),
                                  idempotency_key=None, queue="cpu")
        ids.append(job.id)
    job_store.create(tenant="other", spec=_spec(labels={"team": "a"}), idempotency_key=None, queue="cpu")
    seen, cursor = [], None
    while True:
        page, cursor = job_store.list(tenant="t", limit=2, cursor=cursor)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 7
    team_a, _ = job_store.list(tenant="t", labels={"team": "a"})
    assert len(team_a) == 3 and all(j.spec.labels["team"] == "a" for j in team_a)
    job_store.request_cancel(ids[0])
    cancelled, _ = job_store.list(tenant="t", state="cancelled")
    assert [j.id for j in cancelled] == [ids[0]]


def test_lease_fencing_rejects_a_stale_owner(job_store):
    job, _ = job_store.create(tenant="t", spec=_spec(), idempotency_key=None, queue="cpu")
    first = job_store.claim(job.id, "w1", ttl=0.2)
    assert first is not None and first.attempts == 1
    assert job_store.claim(job.id, "w2", ttl=10) is None  # lease still live
    time.sleep(0.3)
    second = job_store.claim(job.id, "w2", ttl=10)
    assert second is not None and second.token > first.token and second.attempts == 2
    assert job_store.update(job.id, token=first.token, progress=0.5) is False  # stale writer touches nothing
    assert job_store.heartbeat(first, 10) == (False, False)
    assert job_store.update(job.id, token=second.token, progress=0.5) is True
    assert job_store.get(job.id).progress == 0.5


def test_reconciler_finds_expired_leases_once(job_store):
    job, _ = job_store.create(tenant="t", spec=_spec(), idempotency_key=None, queue="cpu")
    job_store.claim(job.id, "w1", ttl=0.05)
    time.sleep(0.1)
    assert (job.id, "cpu") in job_store.stale_jobs(requeue_after=3600)
    assert job_store.mark_requeued(job.id, expected_state="running") is True
    assert job_store.mark_requeued(job.id, expected_state="running") is False
    assert job_store.get(job.id).state == "queued"


def _service(job_store, tmp_path, published):
    return JobService(job_store, ArtifactStore(tmp_path), enqueue=lambda jid, q: published.append((jid, q)))


def test_job_service_submit_cancel_and_tenant_isolation(job_store, tmp_path):
    published = []
    svc = _service(job_store, tmp_path, published)
    job, created = svc.submit("alice", _spec(), idempotency_key="abc")
    assert created and published == [(job.id, "cpu")]
    assert "no live worker" in job.reason
    again, created = svc.submit("alice", _spec(), idempotency_key="abc")
    assert not created and again.id == job.id and len(published) == 1
    with pytest.raises(IdempotencyConflict):
        svc.submit("alice", _spec(dtype="float16"), idempotency_key="abc")
    with pytest.raises(JobNotFound):
        svc.get("bob", job.id)
    with pytest.raises(JobNotFound):
        svc.cancel("bob", job.id)
    assert svc.cancel("alice", job.id).state == "cancelled"
    assert svc.cancel("alice", job.id).state == "cancelled"
    job_store.update(job.id, state="succeeded")
    with pytest.raises(JobFinished):
        svc.cancel("alice", job.id)


def test_gpu_target_no_worker_serves_is_refused(job_store, tmp_path):
    svc = _service(job_store, tmp_path, [])
    job_store.upsert_worker("w1", "host", ["cpu"], {"backends": ["torch"]})
    with pytest.raises(NoWorker, match="build.sm90"):
        svc.submit("t", _spec(build={"target": "sm90"}))
    job_store.upsert_worker("w2", "host", ["cpu", "build.sm90"], {"backends": ["torch"]})
    job, _ = svc.submit("t", _spec(build={"target": "sm90"}))
    assert job.queue == "build.sm90" and job.reason == ""


def test_artifact_commit_is_atomic_and_content_addressed(tmp_path):
    store = ArtifactStore(tmp_path)
    tmp = store.new_tmp("convert")
    (tmp / "sub").mkdir(parents=True)
    (tmp / "config.json").write_text("{}")
    (tmp / "sub" / "rank0.bin").write_bytes(b"x" * 1000)
    assert not store.has("convert", "abc123")
    manifest = store.commit("convert", "abc123", tmp)
    assert store.has("convert", "abc123") and not tmp.exists()
    assert {f["path"] for f in manifest["files"]} == {"config.json", "sub/rank0.bin"}
    # a second writer of the same key loses quietly and leaves nothing behind
    tmp2 = store.new_tmp("convert")
    tmp2.mkdir()
    (tmp2 / "config.json").write_text("{}")
    store.commit("convert", "abc123", tmp2)
    assert not tmp2.exists()
    assert [p.name for p in (tmp_path / "stages" / "convert").iterdir()] == ["abc123"]
    path, entry = store.open_path("convert", "abc123", "sub/rank0.bin")
    assert entry["size"] == 1000 and path.read_bytes() == b"x" * 1000


@pytest.mark.parametrize("bad", ["../secret", "/etc/passwd", "a/../../b", "a\\b", "", "./x", "a//b"])
def test_artifact_paths_that_escape_are_refused(tmp_path, bad):
    with pytest.raises(UnsafePath):
        safe_relpath(bad)
    store = ArtifactStore(tmp_path)
    tmp = store.new_tmp("convert")
    tmp.mkdir()
    (tmp / "f").write_text("x")
    store.commit("convert", "k1", tmp)
    with pytest.raises((UnsafePath, FileNotFoundError)):
        store.open_path("convert", "k1", bad)


def test_sweep_removes_only_stale_temp_dirs(tmp_path):
    store = ArtifactStore(tmp_path)
    old, new = store.new_tmp("convert"), store.new_tmp("convert")
    old.mkdir(), new.mkdir()
    import os
    os.utime(old, (time.time() - 1000, time.time() - 1000))
    assert store.sweep(older_than_s=100) == 1
    assert new.exists() and not old.exists()


def _write_tmp(store: ArtifactStore, owner, nbytes: int = 1000):
    """A stage temp dir of ``owner``'s lease, and the compiler's temp sibling of it (``..tmp-…tmp-…``)."""
    tmp = store.new_tmp("convert", owner=owner)
    tmp.mkdir()
    (tmp / "config.json").write_bytes(b"x" * nbytes)
    sibling = tmp.parent / f".{tmp.name}.tmp-0123456789ab"
    sibling.mkdir()
    (sibling / "rank0.safetensors").write_bytes(b"y" * nbytes)
    return tmp, sibling


def test_reclaim_never_touches_a_live_lease_and_frees_dead_ones(job_store, tmp_path):
    store = ArtifactStore(tmp_path / "storage")
    live_job, _ = job_store.create(tenant="t", spec=_spec(), idempotency_key=None, queue="cpu")
    dead_job, _ = job_store.create(tenant="t", spec=_spec(), idempotency_key=None, queue="cpu")
    live = job_store.claim(live_job.id, "w-live", ttl=600)
    first = job_store.claim(dead_job.id, "w-dead", ttl=600)
    live_dirs = _write_tmp(store, (live.job_id, live.token))
    dead_dirs = _write_tmp(store, (first.job_id, first.token))
    unowned = store.new_tmp("build")
    unowned.mkdir()

    # both leases are current: nothing of theirs goes; an unowned entry only once old enough (None: never)
    freed = store.reclaim_temps(job_store.live_leases)
    assert freed.removed == [] and freed.kept == 5
    # the dead job's lease expires and a new attempt takes it over (new fencing token)
    job_store.update(dead_job.id, lease_expires_at=time.time() - 1)
    second = job_store.claim(dead_job.id, "w-new", ttl=600)
    assert second is not None and second.token == first.token + 1
    freed = store.reclaim_temps(job_store.live_leases)
    assert sorted(freed.removed) == sorted(str(p) for p in dead_dirs)
    assert freed.bytes == 2000
    assert all(p.exists() for p in live_dirs) and not any(p.exists() for p in dead_dirs)
    assert unowned.exists()
    # a lease that expired but nobody took over still counts as live by default (a late heartbeat may
    # renew it); with a grace, one expired longer ago than the grace is dead
    job_store.update(live_job.id, lease_expires_at=time.time() - 100)
    assert store.reclaim_temps(job_store.live_leases).removed == []
    assert store.reclaim_temps(lambda: job_store.live_leases(expired_grace_s=1000)).removed == []
    freed = store.reclaim_temps(lambda: job_store.live_leases(expired_grace_s=10))
    assert len(freed.removed) == 2 and not any(p.exists() for p in live_dirs)


def test_reclaim_for_one_job_and_dry_run(tmp_path):
    store = ArtifactStore(tmp_path)
    a = "11111111-1111-4111-8111-111111111111"
    b = "22222222-2222-4222-8222-222222222222"
    a_old, b_old = _write_tmp(store, (a, 1)), _write_tmp(store, (b, 1))
    a_now = _write_tmp(store, (a, 2))
    dry = store.reclaim_temps(lambda: {(a, 2)}, job_id=a, dry_run=True)
    assert sorted(dry.removed) == sorted(str(p) for p in a_old) and all(p.exists() for p in a_old)
    freed = store.reclaim_temps(lambda: {(a, 2)}, job_id=a)  # what a new claim of job a does
    assert not any(p.exists() for p in a_old)
    assert all(p.exists() for p in a_now + b_old)  # another job's entries are not this call's to judge
    assert freed.bytes == 2000

"""Status-poll reads: batched off the event loop (Coalescer), always fresh, tenant-checked; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest
from sqlalchemy import event, text

from service.domain import JobService, JobSpec
from service.domain.errors import JobNotFound
from service.store import ArtifactStore
from service.store.batching import Coalescer


def _spec(**kw) -> JobSpec:
    return JobSpec(model="org/model", **kw)


def _count_fetches(store) -> list[list[str]]:
    """Record each batched read the store's poll coalescer makes (async on PostgreSQL, threaded on SQLite)."""
    seen: list[list[str]] = []
    real = store._polls._fetch
    if inspect.iscoroutinefunction(real):
        async def counting(keys):
            seen.append(list(keys))
            return await real(keys)
    else:
        def counting(keys):
            seen.append(list(keys))
            return real(keys)
    store._polls._fetch = counting
    return seen


def _count_job_selects(engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(_conn, _cursor, statement, _params, _context, _many):
        if statement.lstrip().upper().startswith("SELECT") and "FROM jobs" in statement:
            seen.append(statement)

    return seen


def test_concurrent_polls_share_one_query_and_each_gets_its_own_job(job_store):
    made = [job_store.create(tenant="t1", spec=_spec(labels={"n": str(i)}), idempotency_key=None, queue="cpu")[0]
            for i in range(40)]
    selects = _count_job_selects(job_store.engine)  # what goes through the engine (not PostgreSQL's async reads)
    fetches = _count_fetches(job_store)

    async def poll_all():
        return await asyncio.gather(*(job_store.get_async(j.id, tenant="t1") for j in made))

    got = asyncio.run(poll_all())
    assert [g.id for g in got] == [j.id for j in made]
    assert [g.spec.labels["n"] for g in got] == [str(i) for i in range(40)]
    # 40 polls, one batched read (a second drain may take a straggler), never one read per poll
    assert 1 <= len(fetches) <= 2 and sorted(sum(fetches, [])) == sorted(j.id for j in made), fetches
    if job_store.engine.dialect.name == "sqlite":
        assert len(selects) == len(fetches), selects


def test_poll_returns_the_state_committed_before_it_was_asked(job_store):
    job, _ = job_store.create(tenant="t1", spec=_spec(), idempotency_key=None, queue="cpu")

    async def scenario():
        first = await job_store.get_async(job.id, tenant="t1")
        assert first.state == "queued"
        for i, state in enumerate(["running", "succeeded"], start=2):
            job_store.update(job.id, state=state, progress=0.5 * (i - 1))
            seen = await asyncio.gather(*(job_store.get_async(job.id, tenant="t1") for _ in range(10)))
            assert {s.state for s in seen} == {state} and {s.version for s in seen} == {first.version + i - 1}

    asyncio.run(scenario())


def test_poll_is_tenant_checked_and_missing_jobs_are_not_found(job_store, tmp_path):
    job, _ = job_store.create(tenant="alice", spec=_spec(), idempotency_key=None, queue="cpu")
    svc = JobService(job_store, ArtifactStore(tmp_path / "artifacts"), enqueue=lambda *_: None)

    async def scenario():
        assert (await svc.poll("alice", job.id)).id == job.id
        with pytest.raises(JobNotFound):
            await svc.poll("bob", job.id)
        with pytest.raises(JobNotFound):
            await svc.poll("alice", "0" * 36)
        # in one batch too: the other tenant's poll of the same id still fails, alice's succeeds
        results = await asyncio.gather(svc.poll("bob", job.id), svc.poll("alice", job.id), return_exceptions=True)
        assert isinstance(results[0], JobNotFound) and results[1].id == job.id

    asyncio.run(scenario())


def test_poll_recovers_when_the_server_drops_its_connection(job_store):
    if job_store.engine.dialect.name != "postgresql":
        pytest.skip("a server-side connection kill needs PostgreSQL")
    job, _ = job_store.create(tenant="t1", spec=_spec(), idempotency_key=None, queue="cpu")

    async def scenario():
        assert (await job_store.get_async(job.id, tenant="t1")).id == job.id  # the store keeps its poll connection
        with job_store.engine.connect() as admin:  # what a server restart does to it
            killed = admin.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        assert killed >= 1
        assert (await job_store.get_async(job.id, tenant="t1")).id == job.id  # replaced once, not an error

    asyncio.run(scenario())


def test_coalescer_batches_and_raises_a_failed_batch_to_each_caller():
    calls: list[list[int]] = []
    gate = threading.Event()

    def fetch(keys):
        calls.append(list(keys))
        gate.wait(5)
        if 13 in keys:
            raise RuntimeError("database is down")
        return {k: k * 10 for k in keys if k != 7}

    co = Coalescer(fetch, max_batch=2, concurrency=1)

    async def scenario():
        first = asyncio.ensure_future(co.get(1))
        await asyncio.sleep(0.05)  # batch [1] is in flight; the next four wait, then go 2 keys a batch
        rest = [asyncio.ensure_future(co.get(k)) for k in (2, 7, 2, 13)]
        gate.set()
        out = await asyncio.gather(first, *rest, return_exceptions=True)
        assert out[:4] == [10, 20, None, 20]  # 7: no row; 2 asked twice, fetched once
        assert isinstance(out[4], RuntimeError)
        assert await co.get(5) == 50  # a failed batch does not stop the next one

    try:
        asyncio.run(scenario())
    finally:
        co.close()
    assert calls == [[1], [2, 7], [13], [5]]
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(co.get(1))


def test_coalescer_refuses_bad_limits():
    with pytest.raises(ValueError):
        Coalescer(dict, max_batch=0)
    with pytest.raises(ValueError):
        Coalescer(dict, concurrency=0)


def test_pg_poll_connections_are_the_stores_own_and_closed_with_it(job_store):
    if job_store.engine.dialect.name != "postgresql":
        pytest.skip("the async poll connections are PostgreSQL's")
    job, _ = job_store.create(tenant="t1", spec=_spec(), idempotency_key=None, queue="cpu")
    reader = job_store._pg_reader

    async def burst():
        await asyncio.gather(*(job_store.get_async(job.id, tenant="t1") for _ in range(50)))

    for _ in range(3):  # three event loops in turn: connections of a closed loop do not pile up
        asyncio.run(burst())
        assert 1 <= len(reader._open) <= reader.concurrency
    job_store.close()
    assert not reader._open
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(job_store.get_async(job.id))


def test_pg_reader_retries_a_dropped_connection_but_not_a_failed_query(db_url, monkeypatch):
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL reader")
    import psycopg

    from service.store.pg_reads import AsyncPgReader

    connects = []
    real_connect = psycopg.AsyncConnection.connect

    async def counting_connect(*args, **kwargs):
        connects.append(1)
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", counting_connect)
    # a query the server cancels (statement_timeout): an OperationalError on a live connection
    reader = AsyncPgReader(db_url + "?options=-c%20statement_timeout%3D50",
                           "SELECT k, pg_sleep(0.5) FROM unnest(%(ids)s::text[]) AS k", dict)
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            asyncio.run(reader.read(["a"]))
        assert len(connects) == 1  # not retried
    finally:
        reader.close()

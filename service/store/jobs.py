"""JobStore: the job rows, the only source of truth about jobs (leases, fencing, attempts, workers).

Every worker write carries the fencing token it was granted (``UPDATE … WHERE fencing_token = :mine``),
so a stale duplicate of a task touches no row and stops.
"""

from __future__ import annotations

import base64
import builtins
import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, and_, any_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError

from service.domain.job import TERMINAL_STATES, ArtifactRef, Job, JobError, StageRecord
from service.domain.spec import JobSpec

from .batching import Coalescer
from .pg_reads import AsyncPgReader, conninfo_from_url
from .tables import job_labels, jobs, workers

_JSON_COLUMNS = ("error", "stages", "artifacts")
POLL_CONN_MAX_AGE_S = 60.0  # a poll thread's kept connection goes back to the pool after this long
# what a Job is made of (row_to_job); the lease, idempotency and webhook bookkeeping stays in the store.
# Built once: a prebuilt statement keeps its compiled form and cache key (no per-poll SQL construction).
_JOB_COLUMNS = [jobs.c[name] for name in Job.model_fields]
_GET_ONE = select(*_JOB_COLUMNS).where(jobs.c.id == bindparam("id"))
_GET_MANY = select(*_JOB_COLUMNS).where(jobs.c.id.in_(bindparam("ids", expanding=True)))
# PostgreSQL: one statement for any batch size (prepared once per connection)
_POLL_PG = select(*_JOB_COLUMNS).where(jobs.c.id == any_(bindparam("ids", type_=ARRAY(String))))


def _dump(value) -> str | None:
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in value]
    return json.dumps(value, separators=(",", ":"))


def row_to_job(row: RowMapping | Mapping[str, Any]) -> Job:
    """A Job from a jobs row (a SQLAlchemy row mapping, or a column-name dict from pg_reads)."""
    return Job(
        id=row["id"],
        tenant=row["tenant"],
        state=row["state"],
        stage=row["stage"],
        progress=row["progress"],
        message=row["message"] or "",
        reason=row["reason"] or "",
        spec=JobSpec.model_validate_json(row["spec"]),
        queue=row["queue"],
        attempts=row["attempts"],
        error=JobError.model_validate_json(row["error"]) if row["error"] else None,
        stages=[StageRecord.model_validate(s) for s in json.loads(row["stages"] or "[]")],
        artifacts=[ArtifactRef.model_validate(a) for a in json.loads(row["artifacts"] or "[]")],
        cancel_requested=bool(row["cancel_requested"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        version=row["version"],
    )


@dataclass(frozen=True)
class Lease:
    job_id: str
    owner: str
    token: int
    attempts: int


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    created, _, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
    return float(created), job_id


class JobStore:
    def __init__(self, engine: Engine):
        self.engine = engine
        # Single-statement reads need no transaction: with AUTOCOMMIT a PostgreSQL read is one round
        # trip instead of three (BEGIN, SELECT, ROLLBACK). pysqlite opens no transaction for a SELECT
        # anyway, and switching its isolation level costs a PRAGMA per checkout, so SQLite reads as is.
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.reader = engine if engine.dialect.name == "sqlite" else autocommit
        # Status polls from async callers never block the event loop, and concurrent ones are batched
        # into one read (batching.py). PostgreSQL (psycopg): the read is awaited on the loop over the
        # store's own async connections (pg_reads.py). Otherwise (SQLite) it runs on a poll thread that
        # keeps one AUTOCOMMIT connection between batches (no pool checkout, reset or isolation-level
        # switch per poll) and trades it for a fresh one every POLL_CONN_MAX_AGE_S.
        self._poll_engine = autocommit
        self._poll_local = threading.local()
        self._poll_conns: set[Connection] = set()
        self._poll_lock = threading.Lock()
        self._pg_reader: AsyncPgReader | None = None
        if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg":
            self._pg_reader = AsyncPgReader(conninfo_from_url(engine.url), str(_POLL_PG.compile(dialect=engine.dialect)),
                                            row_to_job, max_age_s=POLL_CONN_MAX_AGE_S)
            self._polls: Coalescer[str, Job] = Coalescer(self._pg_reader.read, name="kiln-poll")
        else:
            self._polls = Coalescer(self._poll_many, name="kiln-poll")

    def close(self) -> None:
        """Stop the poll threads and close the poll connections (the engine belongs to the caller)."""
        self._polls.close()
        if self._pg_reader is not None:
            self._pg_reader.close()
        with self._poll_lock:
            conns, self._poll_conns = self._poll_conns, set()
        for conn in conns:
            conn.close()

    # -- jobs -------------------------------------------------------------------------------
    def create(self, *, tenant: str, spec: JobSpec, idempotency_key: str | None, queue: str, reason: str = "") -> tuple[Job, bool]:
        """Insert a queued job; with an idempotency key already used by this tenant, return that job."""
        now = time.time()
        job_id = str(uuid.uuid4())
        values = dict(
            id=job_id, tenant=tenant, idempotency_key=idempotency_key, spec_digest=spec.digest(),
            spec=spec.model_dump_json(), state="queued", stage=None, progress=0.0, message="", reason=reason,
            queue=queue, attempts=0, error=None, stages="[]", artifacts="[]", cancel_requested=False,
            fencing_token=0, enqueued_at=now, created_at=now, updated_at=now, version=1,
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(jobs).values(**values))
                if spec.labels:
                    conn.execute(insert(job_labels), [{"job_id": job_id, "key": k, "value": v} for k, v in spec.labels.items()])
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self.get_by_idempotency_key(tenant, idempotency_key)
            if existing is None:
                raise
            return existing, False
        job = self.get(job_id)
        assert job is not None
        return job, True

    def get_by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        with self.reader.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == key)).mappings().first()
        return row_to_job(row) if row else None

    def spec_digest_of(self, job_id: str) -> str | None:
        with self.reader.connect() as conn:
            return conn.execute(select(jobs.c.spec_digest).where(jobs.c.id == job_id)).scalar()

    def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        q = select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            q = q.where(jobs.c.tenant == tenant)
        with self.reader.connect() as conn:
            row = conn.execute(q).mappings().first()
        return row_to_job(row) if row else None

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """The jobs among ``job_ids`` that exist, by id: one indexed query."""
        with self.reader.connect() as conn:
            return self._read_many(conn, job_ids)

    @staticmethod
    def _read_many(conn: Connection, job_ids: Sequence[str]) -> dict[str, Job]:
        if not job_ids:
            return {}
        if len(job_ids) == 1:
            rows = conn.execute(_GET_ONE, {"id": job_ids[0]}).mappings().all()
        else:
            rows = conn.execute(_GET_MANY, {"ids": list(job_ids)}).mappings().all()
        return {row["id"]: row_to_job(row) for row in rows}

    def _poll_many(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """get_many on a poll thread's kept connection; a connection found dead is replaced once."""
        for attempt in (1, 2):
            conn = self._poll_connection()
            try:
                return self._read_many(conn, job_ids)
            except DBAPIError as exc:
                self._drop_poll_connection(conn)
                if attempt == 2 or not exc.connection_invalidated:  # e.g. the server restarted: retry once
                    raise
        raise AssertionError("unreachable")

    def _poll_connection(self) -> Connection:
        local = self._poll_local
        conn = getattr(local, "conn", None)
        if conn is not None and (conn.closed or conn.invalidated or time.monotonic() > local.expires):
            self._drop_poll_connection(conn)
            conn = None
        if conn is None:
            conn = self._poll_engine.connect()
            with self._poll_lock:
                self._poll_conns.add(conn)
            local.conn, local.expires = conn, time.monotonic() + POLL_CONN_MAX_AGE_S
        return conn

    def _drop_poll_connection(self, conn: Connection) -> None:
        with self._poll_lock:
            self._poll_conns.discard(conn)
        if getattr(self._poll_local, "conn", None) is conn:
            self._poll_local.conn = None
        conn.close()

    async def get_async(self, job_id: str, tenant: str | None = None) -> Job | None:
        """``get`` for async callers: never blocks the event loop; concurrent calls share one query."""
        job = await self._polls.get(job_id)
        if job is None or (tenant is not None and job.tenant != tenant):
            return None
        return job

    def version(self, job_id: str) -> int | None:
        with self.reader.connect() as conn:
            return conn.execute(select(jobs.c.version).where(jobs.c.id == job_id)).scalar()

    def list(self, *, tenant: str | None, state: str | None = None, labels: dict[str, str] | None = None,
             limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        q = select(jobs)
        if tenant is not None:
            q = q.where(jobs.c.tenant == tenant)
        if state:
            q = q.where(jobs.c.state == state)
        for key, value in (labels or {}).items():
            sub = select(job_labels.c.job_id).where(job_labels.c.key == key, job_labels.c.value == value)
            q = q.where(jobs.c.id.in_(sub))
        if cursor:
            created, last_id = decode_cursor(cursor)
            q = q.where(or_(jobs.c.created_at < created, and_(jobs.c.created_at == created, jobs.c.id < last_id)))
        q = q.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        with self.reader.connect() as conn:
            rows = conn.execute(q).mappings().all()
        page = [row_to_job(r) for r in rows[:limit]]
        next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit and page else None
        return page, next_cursor

    def count_by_state(self) -> dict[str, int]:
        with self.reader.connect() as conn:
            return {s: n for s, n in conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))}

    def update(self, job_id: str, *, token: int | None = None, only_states: Iterable[str] | None = None, **values) -> bool:
        """Write fields (JSON columns serialised); with ``token``, only while that lease is current."""
        for col in _JSON_COLUMNS:
            if col in values:
                values[col] = _dump(values[col])
        values["updated_at"] = time.time()
        values["version"] = jobs.c.version + 1
        q = update(jobs).where(jobs.c.id == job_id)
        if token is not None:
            q = q.where(jobs.c.fencing_token == token)
        if only_states is not None:
            q = q.where(jobs.c.state.in_(list(only_states)))
        with self.engine.begin() as conn:
            return conn.execute(q.values(**values)).rowcount == 1

    def request_cancel(self, job_id: str) -> Job | None:
        """Queued jobs are cancelled at once; running jobs get a flag their worker sees at heartbeat."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "queued").values(
                state="cancelled", finished_at=now, updated_at=now, message="cancelled before start",
                version=jobs.c.version + 1))
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running",
                                            jobs.c.cancel_requested.is_(False)).values(
                cancel_requested=True, updated_at=now, version=jobs.c.version + 1))
        return self.get(job_id)

    # -- leases -----------------------------------------------------------------------------
    def claim(self, job_id: str, owner: str, ttl: float) -> Lease | None:
        """Take the lease if the job is queued, or running under an expired lease. Bumps the fencing token."""
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs.c.state, jobs.c.lease_expires_at, jobs.c.fencing_token, jobs.c.attempts)
                               .where(jobs.c.id == job_id)).first()
            if row is None or row.state in TERMINAL_STATES:
                return None
            if row.state == "running" and (row.lease_expires_at or 0) > now:
                return None
            token = row.fencing_token + 1
            attempts = row.attempts + 1
            res = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.fencing_token == row.fencing_token)
                               .values(state="running", lease_owner=owner, lease_expires_at=now + ttl,
                                       fencing_token=token, attempts=attempts, started_at=func.coalesce(jobs.c.started_at, now),
                                       reason="", updated_at=now, version=jobs.c.version + 1))
            if res.rowcount != 1:
                return None
        return Lease(job_id, owner, token, attempts)

    def heartbeat(self, lease: Lease, ttl: float) -> tuple[bool, bool]:
        """Extend the lease. Returns (still_ours, cancel_requested)."""
        now = time.time()
        with self.engine.begin() as conn:
            res = conn.execute(update(jobs).where(jobs.c.id == lease.job_id, jobs.c.fencing_token == lease.token,
                                                  jobs.c.state == "running")
                               .values(lease_expires_at=now + ttl))
            if res.rowcount != 1:
                return False, False
            cancel = conn.execute(select(jobs.c.cancel_requested).where(jobs.c.id == lease.job_id)).scalar()
        return True, bool(cancel)

    def release(self, lease: Lease, **values) -> bool:
        return self.update(lease.job_id, token=lease.token, lease_owner=None, lease_expires_at=None, **values)

    def stale_jobs(self, requeue_after: float) -> builtins.list[tuple[str, str]]:
        """(id, queue) of running jobs whose lease expired and queued jobs not enqueued for a while."""
        now = time.time()
        q = select(jobs.c.id, jobs.c.queue).where(or_(
            and_(jobs.c.state == "running", jobs.c.lease_expires_at < now),
            and_(jobs.c.state == "queued", jobs.c.enqueued_at < now - requeue_after),
        ))
        with self.reader.connect() as conn:
            return [(r.id, r.queue) for r in conn.execute(q)]

    def live_leases(self, expired_grace_s: float | None = None) -> set[tuple[str, int]]:
        """(job id, fencing token) of the running jobs' current leases: the writers whose temporary outputs
        must be left alone (``ArtifactStore.reclaim_temps``). By default a lease counts until someone takes
        the job over (the reconciler requeues it, or a new claim bumps the token): a late heartbeat may
        still renew an expired one. ``expired_grace_s``: leases expired longer ago than that count as dead."""
        q = select(jobs.c.id, jobs.c.fencing_token).where(jobs.c.state == "running")
        if expired_grace_s is not None:
            q = q.where(jobs.c.lease_expires_at >= time.time() - expired_grace_s)
        with self.reader.connect() as conn:
            return {(r.id, r.fencing_token) for r in conn.execute(q)}

    def mark_requeued(self, job_id: str, *, expected_state: str) -> bool:
        """Claim the right to re-publish a stale job (one reconciler wins)."""
        now = time.time()
        q = update(jobs).where(jobs.c.id == job_id, jobs.c.state == expected_state)
        if expected_state == "running":
            q = q.where(jobs.c.lease_expires_at < now).values(state="queued", lease_owner=None, lease_expires_at=None,
                                                              message="lease expired; requeued")
        else:
            q = q.where(jobs.c.enqueued_at < now - 1e-3)
        with self.engine.begin() as conn:
            return conn.execute(q.values(enqueued_at=now, updated_at=now, version=jobs.c.version + 1)).rowcount == 1

    # -- workers ----------------------------------------------------------------------------
    def upsert_worker(self, worker_id: str, hostname: str, queues: builtins.list[str], capabilities: dict) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            res = conn.execute(update(workers).where(workers.c.id == worker_id).values(
                heartbeat_at=now, queues=json.dumps(queues), capabilities=json.dumps(capabilities)))
            if res.rowcount == 0:
                conn.execute(insert(workers).values(id=worker_id, hostname=hostname, queues=json.dumps(queues),
                                                    capabilities=json.dumps(capabilities), started_at=now, heartbeat_at=now))

    def remove_worker(self, worker_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id))

    def live_workers(self, ttl: float) -> builtins.list[dict]:
        cutoff = time.time() - ttl
        with self.reader.connect() as conn:
            rows = conn.execute(select(workers).where(workers.c.heartbeat_at >= cutoff).order_by(workers.c.id)).mappings().all()
        return [dict(id=r["id"], hostname=r["hostname"], queues=json.loads(r["queues"]),
                     capabilities=json.loads(r["capabilities"]), started_at=r["started_at"],
                     heartbeat_at=r["heartbeat_at"]) for r in rows]

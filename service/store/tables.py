"""SQLAlchemy tables of the job store. The Alembic migrations in ``migrations/`` create exactly these.

Times are float epoch seconds (portable between SQLite and PostgreSQL). ``version`` increases on
every write so watchers can poll one integer; ``fencing_token`` increases on every lease grant.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("idempotency_key", String(256), nullable=True),
    Column("spec_digest", String(64), nullable=False),
    Column("spec", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("stage", String(64), nullable=True),
    Column("progress", Float, nullable=False, default=0.0),
    Column("message", Text, nullable=False, default=""),
    Column("reason", Text, nullable=False, default=""),
    Column("queue", String(64), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text, nullable=True),
    Column("stages", Text, nullable=False, default="[]"),
    Column("artifacts", Text, nullable=False, default="[]"),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("lease_owner", String(256), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("fencing_token", Integer, nullable=False, default=0),
    Column("enqueued_at", Float, nullable=True),
    Column("webhook_state", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("version", Integer, nullable=False, default=0),
    UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
    Index("ix_jobs_state", "state"),
)

job_labels = Table(
    "job_labels",
    metadata,
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("value", String(128), nullable=False),
    Index("ix_job_labels_kv", "key", "value"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(256), primary_key=True),
    Column("hostname", String(256), nullable=False),
    Column("queues", Text, nullable=False),
    Column("capabilities", Text, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
)

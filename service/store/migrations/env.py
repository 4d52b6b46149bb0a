"""Alembic environment: always run with a connection handed in by ``service.store.db.migrate``."""

from alembic import context

from service.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - offline SQL generation is not supported
    raise RuntimeError("run migrations through service.store.db.migrate(engine)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

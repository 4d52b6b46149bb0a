"""Job store (SQLAlchemy + Alembic) and artifact store (shared filesystem, atomic publish)."""

from .artifacts import ArtifactStore, UnsafePath, safe_relpath, sha256_file
from .db import make_engine, migrate
from .jobs import JobStore, Lease

__all__ = ["ArtifactStore", "JobStore", "Lease", "UnsafePath", "make_engine", "migrate", "safe_relpath", "sha256_file"]

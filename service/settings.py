"""One typed Settings object (``KILN_*`` environment variables) read by the API, workers and CLI.

Defaults are the embedded mode: everything under ``KILN_STORAGE`` (./.kiln), SQLite for jobs, a
file-backed Celery transport, loopback, no API keys. Scaled mode only changes URLs
(``KILN_DATABASE_URL=postgresql://…``, ``KILN_BROKER_URL=redis://…``). Anything that listens
beyond loopback refuses to start without API keys (``Settings.check_listen``).

API keys: ``KILN_API_KEYS="tenant-a:sha256:<hex>,tenant-b:sha256:<hex>"`` (hashes, preferred) or
``tenant:plaintext`` (hashed at load, the plaintext is not kept). ``KILN_API_KEYS_FILE`` names a
file with one entry per line.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class UnsafeConfiguration(RuntimeError):
    """The configuration would expose the service without authentication."""


class InvalidConfiguration(ValueError):
    """Worker reliability settings that cannot work together (``Settings.check_reliability``)."""


MIN_TASK_TIME_LIMIT_S = 30  # below this no real stage finishes and the soft limit leaves no time to clean up
SOFT_LIMIT_MARGIN_S = 60.0  # the soft limit comes at most this long before the hard one ...
SOFT_LIMIT_MARGIN_SHARE = 0.1  # ... and at most this share of the hard limit before it


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    storage: Path = Field(default=Path(".kiln"), description="shared filesystem root for artifacts and caches")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite under storage")
    sources_dir: Path | None = Field(default=None, description="root of the Meta / GGUF model files jobs may name "
                                     "(JobSpec source.path is relative to it); default <storage>/sources")
    broker_url: str | None = Field(default=None, description="Celery broker; default file-backed transport")
    api_keys: str = Field(default="", description="tenant:key or tenant:sha256:<hex>, comma separated")
    api_keys_file: Path | None = None
    metrics_token: str = Field(default="", description="bearer token for /metrics on a keyed server (plain or "
                                                       "sha256:<hex>); tenant keys do not open it")

    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int = 50051
    max_body_bytes: int = 1 << 20
    # slow clients (slowloris): a request's headers, and then its body, must arrive within these many seconds
    request_header_timeout_s: float = Field(10.0, gt=0)
    request_body_timeout_s: float = Field(30.0, gt=0)
    grpc_max_message_bytes: int = 4 << 20
    page_size_max: int = 200

    # Hugging Face token by reference only: the name of an environment variable, or a secret file.
    hf_token_env: str | None = None
    hf_token_file: Path | None = None

    # Worker reliability knobs (seconds). task_time_limit stays below the broker visibility timeout.
    attempt_cap: int = 3
    lease_ttl_s: float = 120.0
    heartbeat_s: float = 30.0
    reconcile_interval_s: float = 30.0
    requeue_after_s: float = 300.0
    task_time_limit_s: int = 6 * 3600
    task_soft_time_limit_s: float | None = Field(
        default=None, description="default: task_time_limit_s - min(60, 10% of it) (soft_time_limit_s)")
    visibility_timeout_s: int = 7 * 3600
    worker_queues: str = "cpu"
    worker_heartbeat_s: float = 10.0
    worker_ttl_s: float = 60.0
    # `kiln serve`'s embedded worker: respawned after a death, the delay doubling from backoff to max;
    # it starts over once a worker stayed up for worker_stable_s
    worker_restart_backoff_s: float = 1.0
    worker_restart_backoff_max_s: float = 60.0
    worker_stable_s: float = 60.0
    stage_plugins: str = Field(default="", description="comma-separated modules that register extra stages")

    # Webhooks
    webhook_secret: str = ""
    webhook_allow_private: bool = False
    webhook_attempts: int = 5
    webhook_backoff_s: float = 1.0

    @property
    def soft_time_limit_s(self) -> float:
        """When a job's task gets SoftTimeLimitExceeded (a clean failure) before the hard kill: explicit,
        or the hard limit less min(60 s, 10% of it) -- 6 h gives 21,540 s, 61 s gives 54.9 s, 30 s gives 27 s."""
        if self.task_soft_time_limit_s is not None:
            return float(self.task_soft_time_limit_s)
        hard = float(self.task_time_limit_s)
        return round(hard - min(SOFT_LIMIT_MARGIN_S, SOFT_LIMIT_MARGIN_SHARE * hard), 3)

    def check_reliability(self) -> list[str]:
        """Refuse worker settings that cannot work (``InvalidConfiguration``, all problems in one message);
        return warnings for ones that work badly. Run by ``kiln serve``, ``kiln worker`` and the Celery app."""
        errors, warnings = [], []
        hard, soft = self.task_time_limit_s, self.soft_time_limit_s
        if hard < MIN_TASK_TIME_LIMIT_S:
            errors.append(f"KILN_TASK_TIME_LIMIT_S={hard} is below the minimum of {MIN_TASK_TIME_LIMIT_S} s: "
                          "every job would be stopped by its time limit")
        if hard >= self.visibility_timeout_s:
            errors.append(f"KILN_TASK_TIME_LIMIT_S={hard} must stay below KILN_VISIBILITY_TIMEOUT_S="
                          f"{self.visibility_timeout_s}: the broker would redeliver a running job to a second worker")
        if self.task_soft_time_limit_s is not None and not 1 <= soft < hard:
            errors.append(f"KILN_TASK_SOFT_TIME_LIMIT_S={self.task_soft_time_limit_s:g} must be at least 1 and below "
                          f"KILN_TASK_TIME_LIMIT_S={hard}")
        if self.lease_ttl_s <= self.heartbeat_s:
            errors.append(f"KILN_LEASE_TTL_S={self.lease_ttl_s:g} must be longer than KILN_HEARTBEAT_S="
                          f"{self.heartbeat_s:g}: every lease would expire between two heartbeats")
        elif self.heartbeat_s > self.lease_ttl_s / 2:
            warnings.append(f"KILN_HEARTBEAT_S={self.heartbeat_s:g} is more than half of KILN_LEASE_TTL_S="
                            f"{self.lease_ttl_s:g}: one late heartbeat loses the lease (a third or less is safe)")
        if self.attempt_cap < 1:
            errors.append(f"KILN_ATTEMPT_CAP={self.attempt_cap} must be at least 1")
        if self.heartbeat_s <= 0 or self.lease_ttl_s <= 0 or self.reconcile_interval_s <= 0:
            errors.append("KILN_HEARTBEAT_S, KILN_LEASE_TTL_S and KILN_RECONCILE_INTERVAL_S must be positive")
        if errors:
            raise InvalidConfiguration("; ".join(errors))
        if hard - soft < 10:
            warnings.append(f"KILN_TASK_TIME_LIMIT_S={hard} leaves {hard - soft:.1f} s between the soft limit "
                            f"({soft:g} s) and the hard kill for a job to fail cleanly")
        if self.reconcile_interval_s > self.lease_ttl_s:
            warnings.append(f"KILN_RECONCILE_INTERVAL_S={self.reconcile_interval_s:g} is longer than KILN_LEASE_TTL_S="
                            f"{self.lease_ttl_s:g}: a crashed worker's job waits up to that long to be taken over")
        return warnings

    @property
    def storage_root(self) -> Path:
        return self.storage.expanduser().resolve()

    @property
    def hf_cache(self) -> Path:
        return self.storage_root / "hf-cache"

    @property
    def sources_root(self) -> Path:
        """Where ``source: {"kind": "meta" | "gguf", "path": ...}`` files live (shared by API and workers)."""
        return self.sources_dir.expanduser().resolve() if self.sources_dir else self.storage_root / "sources"

    @property
    def db_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # psycopg 3 is the driver we install; plain postgresql:// would pick psycopg2.
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            return url
        return f"sqlite:///{self.storage_root / 'kiln.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        return self.storage_root / "broker"

    @property
    def queues(self) -> list[str]:
        return [q.strip() for q in self.worker_queues.split(",") if q.strip()]

    def api_key_hashes(self) -> dict[str, str]:
        """sha256 hex of each key -> tenant. Plaintext keys are hashed here and never stored."""
        entries = [e for e in self.api_keys.split(",") if e.strip()]
        if self.api_keys_file:
            entries += [ln for ln in self.api_keys_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        table: dict[str, str] = {}
        for entry in entries:
            tenant, _, key = entry.strip().partition(":")
            if not tenant or not key:
                raise UnsafeConfiguration("KILN_API_KEYS entries must look like tenant:key or tenant:sha256:<hex>")
            if key.startswith("sha256:"):
                digest = key[len("sha256:"):].lower()
                if len(digest) != 64:
                    raise UnsafeConfiguration(f"API key hash for tenant {tenant!r} is not a sha256 hex digest")
            else:
                digest = hash_api_key(key)
            table[digest] = tenant
        return table

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key_hashes())

    def check_listen(self, host: str | None = None) -> None:
        """Refuse to expose the service beyond loopback without API keys."""
        host = host or self.host
        if not is_loopback(host) and not self.auth_enabled:
            raise UnsafeConfiguration(
                f"refusing to listen on {host!r} without API keys: set KILN_API_KEYS "
                "(tenant:sha256:<hex>) or listen on 127.0.0.1"
            )

    def read_hf_token(self) -> str | None:
        """The HF token, read from its reference at the moment of use; never persisted."""
        if self.hf_token_env:
            value = os.environ.get(self.hf_token_env)
            if value:
                return value.strip()
        if self.hf_token_file and self.hf_token_file.is_file():
            return self.hf_token_file.read_text().strip() or None
        return None

    def metrics_token_hash(self) -> str | None:
        """sha256 hex of the /metrics token, or None when none is configured."""
        t = self.metrics_token.strip()
        if not t:
            return None
        if t.startswith("sha256:"):
            return t[len("sha256:"):].lower()
        import hashlib

        return hashlib.sha256(t.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

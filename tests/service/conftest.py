"""Fixtures for service tests: real SQLite and PostgreSQL job stores, tiny HF models in an HF cache."""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("KILN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class PgDatabase:
    """A throwaway PostgreSQL database, dropped on close."""

    def __init__(self):
        import psycopg

        self.name = f"kiln_test_{uuid.uuid4().hex[:12]}"
        self._psycopg = psycopg
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + self.name

    def close(self):
        with self._psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kiln.db'}"
        return
    if not reachable("127.0.0.1", 5432):
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    db = PgDatabase()
    try:
        yield db.url
    finally:
        db.close()


@pytest.fixture
def job_store(db_url):
    from service.settings import Settings
    from service.store import JobStore, make_engine, migrate

    engine = make_engine(Settings(database_url=db_url).db_url)
    migrate(engine)
    store = JobStore(engine)
    yield store
    store.close()
    engine.dispose()


TINY_REPO = "kiln-test/tiny-llama"


def make_tiny_llama(out: Path, **overrides) -> Path:
    """A random 2-layer Llama saved as safetensors (made in the test, never downloaded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(out, safe_serialization=True)
    return out


def install_in_hf_cache(model_dir: Path, cache_dir: Path, repo_id: str) -> Path:
    """Lay a plain HF folder out as a huggingface_hub cache entry (compiler helper when it exists)."""
    try:
        from service.compiler.sources.smollm2 import install_into_hf_cache
    except ImportError:
        install_into_hf_cache = None
    if install_into_hf_cache is not None:
        return Path(install_into_hf_cache(model_dir, cache_dir, repo_id=repo_id))
    commit = uuid.uuid5(uuid.NAMESPACE_URL, repo_id).hex + "00000000"
    entry = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, snap / f.name)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_variants(tmp_path_factory) -> dict[str, Path]:
    """Models for bad-input cases: an unsupported architecture (edited config)."""
    base = make_tiny_llama(tmp_path_factory.mktemp("tiny-bad") / "weird")
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["WeirdNetForCausalLM"]
    cfg["model_type"] = "weirdnet"
    (base / "config.json").write_text(json.dumps(cfg))
    return {"unsupported": base}


WEIRD_REPO = "kiln-test/weird-net"


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir, tiny_model_variants):
    """One real `kiln serve` (REST + gRPC + a Celery worker on the file transport) shared by API tests."""
    from .harness import free_port, service_env, start_server, stop, wait_http

    root = tmp_path_factory.mktemp("serve")
    env = service_env(root / "storage")
    install_in_hf_cache(tiny_model_dir, root / "storage" / "hf-cache", TINY_REPO)
    install_in_hf_cache(tiny_model_variants["unsupported"], root / "storage" / "hf-cache", WEIRD_REPO)
    http_port, grpc_port = free_port(), free_port()
    proc = start_server(env, root / "serve.log", http_port, grpc_port)
    try:
        wait_http(f"http://127.0.0.1:{http_port}/v1/workers", 90, lambda body: body["workers"])
    except TimeoutError:
        stop(proc)
        raise AssertionError((root / "serve.log").read_text()[-3000:]) from None
    yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "root": root, "env": env}
    stop(proc)

"""Webhooks: HMAC-signed, retried with backoff against a real local HTTP server; private hosts refused by default."""

from __future__ import annotations

import hashlib
import hmac
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from service.domain import JobSpec
from service.settings import Settings
from service.store import JobStore, make_engine, migrate
from service.workers.webhooks import deliver


@pytest.fixture
def receiver():
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls.append((dict(self.headers), body))
            self.send_response(500 if len(calls) == 1 else 204)  # first delivery fails: must be retried
            self.end_headers()

        def log_message(self, *_):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", calls
    server.shutdown()


def _job(tmp_path, url, settings):
    store = JobStore(make_engine(settings.db_url))
    migrate(store.engine)
    job, _ = store.create(tenant="t", spec=JobSpec(model="org/m", webhook_url=url), idempotency_key=None, queue="cpu")
    store.update(job.id, state="succeeded")
    return store, job


def test_webhook_is_signed_and_retried(tmp_path, receiver):
    url, calls = receiver
    settings = Settings(storage=tmp_path, webhook_secret="s3cret", webhook_allow_private=True, webhook_backoff_s=0.05)
    store, job = _job(tmp_path, url, settings)
    outcome = deliver(settings, store, job.id)
    assert outcome.startswith("delivered (attempt 2")
    headers, body = calls[-1]
    expected = hmac.new(b"s3cret", headers["X-Kiln-Timestamp"].encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-Kiln-Signature"] == "sha256=" + expected
    assert b'"state":"succeeded"' in body.replace(b" ", b"")
    assert store.get(job.id).state == "succeeded"


def test_webhook_to_loopback_is_refused_unless_allowed(tmp_path, receiver):
    url, calls = receiver
    settings = Settings(storage=tmp_path, webhook_backoff_s=0.01)
    store, job = _job(tmp_path, url, settings)
    assert deliver(settings, store, job.id).startswith("refused")
    assert calls == []

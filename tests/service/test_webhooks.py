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


def test_delivery_connects_to_the_vetted_address_with_the_host_name_kept(tmp_path, receiver):
    """The request goes to the address that was checked; Host keeps the name (no second DNS lookup)."""
    url, calls = receiver
    port = url.split(":")[2].split("/")[0]
    named = f"http://localhost:{port}/hook"
    settings = Settings(storage=tmp_path, webhook_allow_private=True, webhook_backoff_s=0.01)
    store, job = _job(tmp_path, named, settings)
    assert deliver(settings, store, job.id).startswith("delivered")
    assert calls[-1][0]["Host"] == f"localhost:{port}"


def test_a_dns_answer_that_changes_after_the_check_is_not_followed(monkeypatch):
    """DNS rebinding: the first answer (checked, public) is the one connected to, never the second."""
    import socket

    from service.workers import webhooks

    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 0))],
                    [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]])
    monkeypatch.setattr(webhooks.socket, "getaddrinfo", lambda *a, **k: next(answers))
    addresses = webhooks.check_webhook_url("https://hooks.example.com:8443/x?y=1", allow_private=False)
    target, host, ext = webhooks.pinned_request("https://hooks.example.com:8443/x?y=1", addresses[0])
    assert target == "https://93.184.215.14:8443/x?y=1"
    assert host == {"Host": "hooks.example.com:8443"} and ext == {"sni_hostname": "hooks.example.com"}
    with pytest.raises(Exception, match="loopback/private"):  # the changed answer is refused if checked
        webhooks.check_webhook_url("https://hooks.example.com/x", allow_private=False)


def test_ipv6_addresses_are_bracketed():
    from service.workers.webhooks import pinned_request

    assert pinned_request("http://h.example/a", "2001:db8::5")[0] == "http://[2001:db8::5]/a"

"""Webhooks aimed at private space: every spelling of a loopback / private / link-local / metadata address is
refused at submit and at delivery, names that resolve there too, and a public endpoint that answers with a
redirect into private space (a real local HTTP server answering 302 to http://127.0.0.1/...) reaches nothing."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from service.domain import JobSpec
from service.domain.errors import InvalidSpec
from service.settings import Settings
from service.store import JobStore, make_engine, migrate
from service.workers import webhooks
from service.workers.stages import make_submit_validator

PRIVATE = [
    "http://127.0.0.1/h", "http://127.1/h", "http://127.255.255.254/h", "http://0/h", "http://0.0.0.0/h",
    "http://2130706433/h", "http://0x7f000001/h", "http://0177.0.0.1/h", "http://017700000001/h",  # decimal, hex, octal
    "http://10.0.0.1/h", "http://172.16.5.4/h", "http://192.168.1.1/h", "http://100.64.0.1/h", "http://100.100.100.200/h",
    "http://169.254.169.254/latest/meta-data/", "http://[::1]/h", "http://[::]/h", "http://[fc00::1]/h",
    "http://[fd00:ec2::254]/h", "http://[fe80::1]/h", "http://[::ffff:127.0.0.1]/h", "http://[::ffff:a9fe:a9fe]/h",
    "http://[::127.0.0.1]/h", "http://[64:ff9b::a9fe:a9fe]/h", "http://[2002:7f00:1::]/h", "http://localhost/h",
    "http://LOCALHOST./h", "http://a.localhost/h", "http://metadata.google.internal/h", "https://224.0.0.1/h",
    "https://127.0.0.1:8443/h",
]


@pytest.mark.parametrize("url", PRIVATE)
def test_private_webhook_targets_are_refused_at_submit(tmp_path, url):
    validate = make_submit_validator(Settings(storage=tmp_path))
    with pytest.raises(InvalidSpec) as info:
        validate(JobSpec(model="org/m", webhook_url=url))
    assert "private" in info.value.message or "resolve" in info.value.message, info.value.message
    assert info.value.hint


def _fake_dns(monkeypatch, answers: dict[str, list[str]]):
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host in answers:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0))
                    for a in answers[host]]
        return real(host, *args, **kwargs)
    monkeypatch.setattr(webhooks.socket, "getaddrinfo", getaddrinfo)


def test_names_that_resolve_to_private_addresses_are_refused(monkeypatch):
    """A name is checked by every address it resolves to (one private answer among public ones is enough)."""
    _fake_dns(monkeypatch, {"internal.example.com": ["10.1.2.3"], "mixed.example.com": ["93.184.215.14", "127.0.0.1"],
                            "v6.example.com": ["::ffff:169.254.169.254"], "public.example.com": ["93.184.215.14"]})
    for host in ("internal.example.com", "mixed.example.com", "v6.example.com", "localhost"):
        with pytest.raises(InvalidSpec, match="private"):
            webhooks.check_webhook_url(f"https://{host}/hook", allow_private=False)
    assert webhooks.check_webhook_url("https://public.example.com/hook", allow_private=False) == ["93.184.215.14"]


def _server(host: str, handler_status: int, location: str | None, hits: list):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hits.append(self.path)
            self.send_response(handler_status)
            if location:
                self.send_header("Location", location)
            self.end_headers()

        def log_message(self, *_):
            pass

    server = HTTPServer((host, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("allow_private", [False, True])
def test_a_redirect_into_private_space_is_not_followed(tmp_path, monkeypatch, allow_private):
    """The endpoint (127.0.0.2, standing in for a public host: the guard is told it is public) answers
    302 Location: http://127.0.0.1:<port>/steal. The internal server gets nothing, the endpoint one request
    (no retries), and the job's webhook state says why. Even with private webhooks allowed, no redirect is followed."""
    internal_hits, public_hits = [], []
    internal = _server("127.0.0.1", 200, None, internal_hits)
    public = _server("127.0.0.2", 302, f"http://127.0.0.1:{internal.server_port}/steal", public_hits)
    real = webhooks.is_private_host
    monkeypatch.setattr(webhooks, "is_private_host", lambda h: False if h == "127.0.0.2" else real(h))
    try:
        settings = Settings(storage=tmp_path, webhook_backoff_s=0.01, webhook_allow_private=allow_private)
        store = JobStore(make_engine(settings.db_url))
        migrate(store.engine)
        job, _ = store.create(tenant="t", spec=JobSpec(model="org/m", webhook_url=f"http://127.0.0.2:{public.server_port}/hook"),
                              idempotency_key=None, queue="cpu")
        store.update(job.id, state="succeeded")
        outcome = webhooks.deliver(settings, store, job.id)
        assert outcome.startswith("refused: HTTP 302 redirect not followed"), outcome
        assert public_hits == ["/hook"] and internal_hits == []
    finally:
        internal.shutdown()
        public.shutdown()

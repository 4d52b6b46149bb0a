"""Completion webhooks: POST the job's public state, signed with HMAC-SHA256, retried with backoff.

Headers: ``X-Kiln-Timestamp`` and ``X-Kiln-Signature: sha256=<hex of HMAC(secret, timestamp + "." + body)>``.
Loopback, private, link-local and similar addresses are refused unless ``KILN_WEBHOOK_ALLOW_PRIVATE``;
the check runs on every address the host name resolves to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from urllib.parse import urlsplit

from service.domain.errors import InvalidSpec
from service.domain.spec import is_private_host
from service.settings import Settings
from service.store import JobStore

log = logging.getLogger("kiln.webhooks")


def check_webhook_url(url: str, *, allow_private: bool) -> None:
    host = urlsplit(url).hostname or ""
    if allow_private:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise InvalidSpec(f"webhook host {host!r} does not resolve") from exc
    if is_private_host(host) or any(is_private_host(a) for a in addresses):
        raise InvalidSpec(f"webhook host {host!r} is a loopback/private address",
                          hint="the operator can allow private webhooks with KILN_WEBHOOK_ALLOW_PRIVATE=1")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def deliver(settings: Settings, store: JobStore, job_id: str) -> str:
    import httpx

    job = store.get(job_id)
    if job is None or not job.spec.webhook_url:
        return "none"
    url = job.spec.webhook_url
    body = json.dumps({"id": job.id, "state": job.state, "error": job.error.model_dump() if job.error else None,
                       "artifacts": [a.name for a in job.artifacts], "finished_at": job.finished_at}).encode()
    outcome = "failed"
    for attempt in range(1, settings.webhook_attempts + 1):
        try:
            check_webhook_url(url, allow_private=settings.webhook_allow_private)
        except InvalidSpec as exc:
            outcome = f"refused: {exc.message}"
            break
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Kiln-Timestamp": ts, "X-Kiln-Event": "job.finished",
                   "X-Kiln-Signature": sign(settings.webhook_secret, ts, body)}
        try:
            resp = httpx.post(url, content=body, headers=headers, timeout=10.0, follow_redirects=False)
            if 200 <= resp.status_code < 300:
                outcome = f"delivered (attempt {attempt}, HTTP {resp.status_code})"
                break
            outcome = f"HTTP {resp.status_code} after {attempt} attempts"
        except httpx.HTTPError as exc:
            outcome = f"{type(exc).__name__} after {attempt} attempts"
        time.sleep(settings.webhook_backoff_s * (2 ** (attempt - 1)))
    store.update(job_id, webhook_state=outcome)
    log.info("webhook for job %s: %s", job_id, outcome)
    return outcome


def notify_job(settings: Settings, store: JobStore, job_id: str) -> None:
    threading.Thread(target=deliver, args=(settings, store, job_id), name=f"webhook-{job_id[:8]}", daemon=True).start()

"""Completion webhooks: POST the job's public state, signed with HMAC-SHA256, retried with backoff.

Headers: ``X-Kiln-Timestamp`` and ``X-Kiln-Signature: sha256=<hex of HMAC(secret, timestamp + "." + body)>``.
Loopback, private, link-local and similar addresses are refused unless ``KILN_WEBHOOK_ALLOW_PRIVATE``;
the check runs on every address the host name resolves to, and the request then goes to the address
that was checked (the URL's host replaced by it; ``Host`` header and TLS SNI / certificate name stay
the host name), so a DNS answer that changes between the check and the connection (DNS rebinding)
cannot redirect the delivery to an internal address. Redirects are never followed (a 3xx answer ends the
delivery as refused, without retries): a public endpoint answering ``302 Location: http://127.0.0.1/...``
reaches nothing.
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


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidSpec(f"webhook host {host!r} does not resolve",
                          hint="check the webhook URL's host name; it must resolve from the workers") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))  # AF_INET(6) addresses are str already


def check_webhook_url(url: str, *, allow_private: bool) -> list[str]:
    """The addresses ``url``'s host resolves to, all of them vetted (unless private hosts are allowed)."""
    host = urlsplit(url).hostname or ""
    refused = InvalidSpec(f"webhook host {host!r} is a loopback/private address",
                          hint="use a publicly reachable https endpoint; the operator can allow private webhooks "
                               "with KILN_WEBHOOK_ALLOW_PRIVATE=1")
    if not allow_private and is_private_host(host):  # by name or literal first: no DNS query for those
        raise refused
    addresses = _resolve(host)
    if not allow_private and any(is_private_host(a) for a in addresses):
        raise refused
    return addresses


def pinned_request(url: str, address: str) -> tuple[str, dict[str, str], dict]:
    """(URL with the host replaced by the vetted ``address``, the Host header, httpx extensions with the
    TLS server name) for a request that connects to exactly that address."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = f"[{address}]" if ":" in address else address
    netloc = literal + (f":{parts.port}" if parts.port else "")
    host_header = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    pinned = parts._replace(netloc=netloc).geturl()
    return pinned, {"Host": host_header}, ({"sni_hostname": host} if parts.scheme == "https" else {})


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
            addresses = check_webhook_url(url, allow_private=settings.webhook_allow_private)
        except InvalidSpec as exc:
            outcome = f"refused: {exc.message}"
            break
        ts = str(int(time.time()))
        target, host_header, extensions = pinned_request(url, addresses[0])
        headers = {"Content-Type": "application/json", "X-Kiln-Timestamp": ts, "X-Kiln-Event": "job.finished",
                   "X-Kiln-Signature": sign(settings.webhook_secret, ts, body), **host_header}
        try:
            with httpx.Client(timeout=10.0, follow_redirects=False) as client:
                resp = client.send(client.build_request("POST", target, content=body, headers=headers,
                                                        extensions=extensions))
            if 200 <= resp.status_code < 300:
                outcome = f"delivered (attempt {attempt}, HTTP {resp.status_code})"
                break
            if 300 <= resp.status_code < 400:  # never followed: a redirect could point into private space
                outcome = f"refused: HTTP {resp.status_code} redirect not followed (webhooks must answer 2xx directly)"
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

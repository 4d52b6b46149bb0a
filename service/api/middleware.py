"""Pure ASGI middleware of the REST API (cheaper than BaseHTTPMiddleware on the hot polling path)."""

from __future__ import annotations

import asyncio
import json
import time

from service.domain.errors import DEFAULT_HINTS


class BodySizeLimit:
    """413 when Content-Length or the streamed body exceeds the limit; 408 when the body does not arrive in full
    within ``timeout_s`` of the request's start (a client trickling its body, slowloris-style, would otherwise
    hold a connection and a task as long as it likes; the 408 says ``Connection: close``, so the server drops
    the connection, and other requests are not delayed). A request with a body (at most ``max_bytes``) is read
    here and replayed to the app. Headers are bounded before the app sees the request (``header_timeout_protocol``).
    """

    def __init__(self, app, max_bytes: int, timeout_s: float | None = None):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for name, value in scope.get("headers", []):  # one pass: this runs on every request
            if name == b"content-length":
                if value.isdigit() and int(value) > self.max_bytes:
                    return await self._reject(send)
                length = value
        if length in (None, b"0") and (length == b"0" or scope["method"] not in ("POST", "PUT", "PATCH")):
            return await self.app(scope, receive, send)
        # a body: read it here, bounded in size and time, so an oversized one is a 413 (not a parse error) and a
        # trickled one a 408
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        chunks, seen = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), None if deadline is None else max(0.0, deadline - loop.time()))
            except TimeoutError:
                return await self._timeout(send)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._reject(send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, send)

    async def _reject(self, send):
        await _send_error(send, 413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes",
                          "send a JobSpec, not model data")

    async def _timeout(self, send):
        await _send_error(send, 408, "request_timeout", f"the request body did not arrive within {self.timeout_s:g} s",
                          DEFAULT_HINTS["request_timeout"], close=True)


async def _send_error(send, status: int, code: str, message: str, hint: str, close: bool = False) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "hint": hint}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(base: type, timeout_s: float) -> type:
    """uvicorn's HTTP protocol class ``base`` with a deadline on each request's headers: uvicorn (0.55) bounds
    the idle time between keep-alive requests but not a request whose headers trickle in, so a slowloris
    client could hold a connection forever. The connection is closed when a request's headers are not
    complete ``timeout_s`` after its first byte (or after the connection opened).
    The body has its own deadline (``BodySizeLimit``)."""

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _between_requests(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout_s, self._expire, getattr(self, "cycle", None))

        def _expire(self, cycle) -> None:
            self._header_timer = None
            if getattr(self, "cycle", None) is cycle and self._between_requests() and not self.transport.is_closing():
                self.transport.close()  # still no complete request line + headers since the deadline was set

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                self._arm()  # a new request's headers are arriving
            super().data_received(data)
            if not self._between_requests() and self._header_timer is not None:
                self._header_timer.cancel()  # headers complete: the body deadline takes over (BodySizeLimit)
                self._header_timer = None

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


class Metrics:
    """Request counters by (method, route template, status) and seconds by route, for /metrics."""

    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = {}
        self.seconds: dict[str, float] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.seconds[route] = self.seconds.get(route, 0.0) + seconds


class ObserveRequests:
    """Counts and times requests into a Metrics."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            # the template without convertors: /v1/jobs/{job_id}, not /v1/jobs/{job_id:job_id}
            self.metrics.observe(scope["method"], getattr(route, "path_format", "unmatched"), status[0],
                                 time.perf_counter() - start)

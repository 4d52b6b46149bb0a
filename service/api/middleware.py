"""Pure ASGI middleware of the REST API (cheaper than BaseHTTPMiddleware on the hot polling path)."""

from __future__ import annotations

import json
import time


class BodySizeLimit:
    """413 when Content-Length or the streamed body exceeds the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        has_length = False
        for name, value in scope.get("headers", []):  # one pass: this runs on every request
            if name == b"content-length":
                has_length = True
                if value.isdigit() and int(value) > self.max_bytes:
                    return await self._reject(send)
        if not has_length and scope["method"] in ("POST", "PUT", "PATCH"):
            # chunked upload: read it here (bounded by the limit) so an oversized one is a 413, not a parse error
            chunks, seen = [], 0
            while True:
                message = await receive()
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
        return await self.app(scope, receive, send)

    async def _reject(self, send):
        body = json.dumps({"error": {"code": "payload_too_large", "message": f"request body exceeds {self.max_bytes} bytes",
                                     "hint": "send a JobSpec, not model data"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


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

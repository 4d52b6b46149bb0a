"""The REST API: a thin FastAPI adapter over JobService. Run it with ``kiln serve``.

Errors leave through the one error table (``service.domain.errors``) as ``{"error": {code, message, hint}}``.
Artifacts are served from their manifests only (no StaticFiles over storage), as attachments.
"""


import asyncio
import hashlib
import hmac
import inspect
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.convertors import StringConvertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.compiler.errors import KilnError
from service.domain import JobService, JobSpec, error_body, status_for
from service.domain.errors import DomainError, InvalidSpec, Unauthenticated
from service.settings import Settings, get_settings

from .auth import KeyRing, key_from_headers
from .downloads import parse_range, stream_tar
from .schemas import (
    ArtifactList,
    ArtifactOut,
    ErrorOut,
    JobCreated,
    JobList,
    JobOut,
    WorkerList,
    WorkerOut,
    links_for,
)

DASHBOARD = Path(__file__).with_name("dashboard")
ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 404, 409, 413, 422)}
# the headers GET /v1/jobs/{job_id} reads itself (OpenAPI parameters, as Header() would document them)
POLL_HEADERS = [{"name": name, "in": "header", "required": False, "schema": {"type": "string"}, "description": text}
                for name, text in (("authorization", "Bearer <API key>"), ("x-api-key", "API key (instead of Authorization)"),
                                   ("if-none-match", "an ETag from an earlier poll: 304 while the job is unchanged"))]


class DirectRoute(APIRoute):
    """An APIRoute (matched in order, documented in OpenAPI from its endpoint as usual) whose endpoint is
    called directly: ``endpoint(request=Request, **path_params) -> Response``. It skips FastAPI's
    per-request dependency resolution, validation and exit stacks, which cost more CPU than the rest of
    a status poll. So the endpoint may take only ``request: Request`` and ``str`` path parameters, and
    must return a Response; exceptions reach the app's exception handlers as from any route."""

    def __init__(self, path: str, endpoint, **kwargs):
        super().__init__(path, endpoint, **kwargs)
        params = inspect.signature(endpoint).parameters
        path_names = set(self.param_convertors)
        for name, param in params.items():
            ok = (param.annotation is Request and name == "request") or \
                (name in path_names and param.annotation in (str, "str") and
                 isinstance(self.param_convertors[name], StringConvertor))
            if not ok:
                raise TypeError(f"DirectRoute {path}: parameter {name!r} must be `request: Request` or a str path parameter")
        if "request" not in params:
            raise TypeError(f"DirectRoute {path}: the endpoint must take `request: Request`")
        self.app = self._serve

    async def _serve(self, scope, receive, send):
        response = await self.endpoint(request=Request(scope, receive, send), **scope["path_params"])
        await response(scope, receive, send)


class BodySizeLimit:
    """Pure ASGI middleware: 413 when Content-Length or the streamed body exceeds the limit."""

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
    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = {}
        self.seconds: dict[str, float] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.seconds[route] = self.seconds.get(route, 0.0) + seconds


class ObserveRequests:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot polling path): counts and times requests."""

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
            self.metrics.observe(scope["method"], getattr(route, "path", "unmatched"), status[0], time.perf_counter() - start)


def create_app(settings: Settings | None = None, *, runtime=None) -> FastAPI:
    settings = settings or get_settings()
    keys = KeyRing(settings.api_key_hashes())
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = runtime is None
        if own:
            from .wiring import build_runtime

            app.state.runtime = await asyncio.to_thread(build_runtime, settings)
        else:
            app.state.runtime = runtime
        yield
        if own:
            app.state.runtime.close()

    app = FastAPI(title="Kiln", version="1.0", lifespan=lifespan,
                  description="Compile Hugging Face models into TensorRT-LLM checkpoints and engines.")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObserveRequests, metrics=metrics)

    @app.exception_handler(DomainError)
    async def _domain_error(_req, exc: DomainError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()[:10])
        return _error_response(InvalidSpec(f"invalid request: {problems}", hint="see /docs for the JobSpec schema"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc: StarletteHTTPException):  # unknown routes, wrong methods: same envelope
        code = {400: "invalid_argument", 401: "unauthenticated", 404: "not_found", 413: "payload_too_large"}.get(
            exc.status_code, f"http_{exc.status_code}")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail), "hint": ""}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(KilnError)
    async def _compiler_error(_req, exc: KilnError):  # e.g. invalid_mapping from the submit-time preflight
        return _error_response(exc)

    # async: trivial dependencies must not each cost a threadpool hop on the polling path
    async def service_dep(request: Request) -> JobService:
        return request.app.state.runtime.service

    async def tenant_dep(authorization: Annotated[str | None, Header()] = None,
                   x_api_key: Annotated[str | None, Header()] = None) -> str:
        return keys.tenant_for(key_from_headers(authorization, x_api_key))

    Service = Annotated[JobService, Depends(service_dep)]
    Tenant = Annotated[str, Depends(tenant_dep)]

    @app.post("/v1/jobs", status_code=202, response_model=JobCreated, responses=ERRORS, tags=["jobs"])
    def submit_job(spec: JobSpec, svc: Service, tenant: Tenant,
                   idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> JobCreated:
        """Queue a compilation. The same Idempotency-Key and spec return the first job (`created: false`)."""
        job, created = svc.submit(tenant, spec, idempotency_key)
        return JobCreated(id=job.id, state=job.state, created=created, links=links_for(job.id))

    @app.get("/v1/jobs", response_model=JobList, responses=ERRORS, tags=["jobs"])
    def list_jobs(svc: Service, tenant: Tenant, state: str | None = None,
                  label: Annotated[list[str] | None, Query(description="key=value, repeatable")] = None,
                  limit: int = 50, cursor: str | None = None) -> JobList:
        labels = {}
        for item in label or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidSpec(f"label filter {item!r} must look like key=value")
            labels[key] = value
        jobs, next_cursor = svc.list(tenant, state=state, labels=labels, limit=limit, cursor=cursor)
        return JobList(jobs=[JobOut.of(j) for j in jobs], next_cursor=next_cursor)

    async def get_job(job_id: str, request: Request) -> Response:
        """The job's state, stage, progress, per-stage timings and cache hits, error and artifacts.
        Pollers may send the returned ETag as If-None-Match and get 304 while nothing changed."""
        # The hottest route, so a DirectRoute: its headers are read here rather than as Header()/Depends()
        # parameters (documented by POLL_HEADERS; the same key check as tenant_dep).
        headers = request.headers
        tenant = keys.tenant_for(key_from_headers(headers.get("authorization"), headers.get("x-api-key")))
        # One indexed primary-key read that never blocks the event loop for a database round trip;
        # polls that arrive while a read is in flight share the next one (WHERE id = ANY(...)).
        job = await request.app.state.runtime.service.poll(tenant, job_id)
        etag = f'"{job.version}"'
        if headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        # serialised once by pydantic (the hot polling path skips FastAPI's second validation pass)
        return Response(JobOut.of(job).model_dump_json(), media_type="application/json", headers={"ETag": etag})

    app.router.add_api_route("/v1/jobs/{job_id}", get_job, methods=["GET"], route_class_override=DirectRoute,
                             response_model=JobOut, responses={**ERRORS, 304: {"description": "unchanged (If-None-Match)"}},
                             tags=["jobs"], openapi_extra={"parameters": POLL_HEADERS})

    @app.post("/v1/jobs/{job_id}:cancel", response_model=JobOut, responses=ERRORS, tags=["jobs"])
    def cancel_job(job_id: str, svc: Service, tenant: Tenant) -> JobOut:
        return JobOut.of(svc.cancel(tenant, job_id))

    @app.get("/v1/jobs/{job_id}/events", responses=ERRORS, tags=["jobs"],
             response_class=StreamingResponse)
    async def job_events(job_id: str, svc: Service, tenant: Tenant):
        """Server-sent events: one `job` event per change, then `end` at a terminal state."""
        await asyncio.to_thread(svc.get, tenant, job_id)  # 404 before the stream starts

        async def events():
            async for job in svc.watch(tenant, job_id):
                yield f"event: job\nid: {job.version}\ndata: {JobOut.of(job).model_dump_json()}\n\n"
            yield "event: end\ndata: {}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/artifacts", response_model=ArtifactList, responses=ERRORS, tags=["artifacts"])
    def list_artifacts(job_id: str, svc: Service, tenant: Tenant) -> ArtifactList:
        job = svc.get(tenant, job_id)
        out = []
        for ref in job.artifacts:
            stage, key, manifest = svc.artifact(tenant, job_id, ref.name)
            base = f"/v1/jobs/{job_id}/artifacts/{ref.name}"
            out.append(ArtifactOut(name=ref.name, stage=stage, key=key, bytes=manifest.get("bytes", 0),
                                   files=manifest["files"], download=f"{base}/files/", archive=f"{base}.tar"))
        return ArtifactList(artifacts=out)

    @app.get("/v1/jobs/{job_id}/artifacts/{name}.tar", responses=ERRORS, tags=["artifacts"],
             response_class=StreamingResponse)
    def artifact_tar(job_id: str, name: str, svc: Service, tenant: Tenant):
        """The whole artifact as a tar stream (files + manifest.json)."""
        stage, key, manifest = svc.artifact(tenant, job_id, name)
        entries = [(f"{name}/{f['path']}", svc.artifact_file(tenant, job_id, name, f["path"])[0]) for f in manifest["files"]]
        entries.append((f"{name}/manifest.json", svc.artifacts.path(stage, key) / "manifest.json"))
        return StreamingResponse(stream_tar(entries), media_type="application/x-tar",
                                 headers={"Content-Disposition": f'attachment; filename="{name}.tar"'})

    @app.get("/v1/jobs/{job_id}/artifacts/{name}/files/{path:path}", responses={**ERRORS, 416: {"model": ErrorOut}},
             tags=["artifacts"], response_class=StreamingResponse)
    def artifact_file(job_id: str, name: str, path: str, svc: Service, tenant: Tenant,
                      range_header: Annotated[str | None, Header(alias="Range")] = None):
        """One file of an artifact; honours a single `Range: bytes=` request (resume)."""
        file, entry = svc.artifact_file(tenant, job_id, name, path)
        size = entry["size"]
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{entry["sha256"]}"', "X-Content-SHA256": entry["sha256"],
                   "Content-Disposition": f'attachment; filename="{Path(entry["path"]).name}"',
                   "X-Content-Type-Options": "nosniff"}
        try:
            rng = parse_range(range_header, size)
        except DomainError as exc:
            return _error_response(exc, {"Content-Range": f"bytes */{size}"})
        if rng is None:
            headers["Content-Length"] = str(size)
            return StreamingResponse(svc.artifacts.iter_file(file), media_type="application/octet-stream", headers=headers)
        start, end = rng
        headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
        return StreamingResponse(svc.artifacts.iter_file(file, start, end), status_code=206,
                                 media_type="application/octet-stream", headers=headers)

    @app.get("/v1/jobs/{job_id}/report", responses=ERRORS, tags=["jobs"])
    def job_report(job_id: str, svc: Service, tenant: Tenant) -> dict:
        """Stages with timings and cache hits, the spec, errors, and every artifact file with its sha256."""
        return svc.report(tenant, job_id)

    @app.get("/v1/workers", response_model=WorkerList, responses=ERRORS, tags=["workers"])
    def list_workers(request: Request, svc: Service, tenant: Tenant) -> WorkerList:
        """Live workers (registered, heartbeat within KILN_WORKER_TTL_S) and, under `kiln serve`, the
        state of its supervised worker process (restarts, last exit, pending respawn)."""
        return WorkerList(workers=[WorkerOut(id=w["id"], hostname=w["hostname"], queues=w["queues"],
                                             gpus=w["capabilities"].get("gpus", []),
                                             backends=w["capabilities"].get("backends", []),
                                             heartbeat_at=w["heartbeat_at"]) for w in svc.workers()],
                          embedded_worker=_embedded_worker(request))

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz(request: Request, svc: Service) -> Response:
        """200 while the database and storage answer. ``embedded_worker`` (under `kiln serve`) says whether
        its worker runs or is being respawned; jobs submitted meanwhile wait queued."""
        try:
            svc.store.version("readyz-probe")
            svc.artifacts.root.mkdir(parents=True, exist_ok=True)
        except Exception as exc:  # database or storage down
            return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, status_code=503)
        body = {"status": "ready", "workers": len(svc.workers())}
        embedded = _embedded_worker(request)
        if embedded is not None:
            body["embedded_worker"] = embedded
        return JSONResponse(body)

    metrics_hash = settings.metrics_token_hash()

    @app.get("/metrics", response_class=PlainTextResponse, tags=["ops"],
             responses={401: {"description": "keyed server: missing or wrong metrics token"}})
    def prometheus(svc: Service, authorization: str | None = Header(default=None)) -> str:
        """Prometheus text. Its job counts span every tenant, so on a keyed server it needs
        ``Authorization: Bearer <KILN_METRICS_TOKEN>`` (tenant API keys do not open it)."""
        if keys.enabled:
            presented = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else ""
            digest = hashlib.sha256(presented.encode()).hexdigest()
            if not (metrics_hash and presented and hmac.compare_digest(digest, metrics_hash)):
                raise Unauthenticated("/metrics needs the metrics token",
                                      hint="send Authorization: Bearer <token>; the operator sets KILN_METRICS_TOKEN")
        lines = ["# HELP kiln_http_requests_total HTTP requests by route and status",
                 "# TYPE kiln_http_requests_total counter"]
        for (method, route, status), n in sorted(metrics.requests.items()):
            lines.append(f'kiln_http_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
        lines += ["# HELP kiln_http_request_seconds_total time spent per route", "# TYPE kiln_http_request_seconds_total counter"]
        lines += [f'kiln_http_request_seconds_total{{route="{r}"}} {s:.6f}' for r, s in sorted(metrics.seconds.items())]
        lines += ["# HELP kiln_jobs jobs by state", "# TYPE kiln_jobs gauge"]
        lines += [f'kiln_jobs{{state="{s}"}} {n}' for s, n in sorted(svc.store.count_by_state().items())]
        lines += ["# HELP kiln_workers live workers", "# TYPE kiln_workers gauge", f"kiln_workers {len(svc.workers())}"]
        return "\n".join(lines) + "\n"

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    if DASHBOARD.is_dir():
        app.mount("/dashboard", StaticFiles(directory=DASHBOARD, html=True), name="dashboard")

    return app


def _embedded_worker(request: Request) -> dict | None:
    supervisor = getattr(request.app.state.runtime, "supervisor", None)
    return supervisor.status() if supervisor is not None else None


def _error_response(exc, headers: dict | None = None) -> JSONResponse:
    body = error_body(exc)
    status, _grpc = status_for(body["code"])
    return JSONResponse({"error": body}, status_code=status, headers=headers)

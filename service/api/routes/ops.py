"""Operations: liveness, readiness, Prometheus metrics, and the live workers."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.domain.errors import Unauthenticated

from ..dependencies import RequestMetrics, Service, Tenant, keys_of
from ..errors import ERROR_RESPONSES, RETRY_AFTER_S
from ..schemas import WorkerList, WorkerOut

router = APIRouter()


@router.get("/v1/workers", response_model=WorkerList, responses=ERROR_RESPONSES, tags=["workers"])
def list_workers(request: Request, svc: Service, tenant: Tenant) -> WorkerList:
    """Live workers (registered, heartbeat within KILN_WORKER_TTL_S) and, under `kiln serve`, the
    state of its supervised worker process (restarts, last exit, pending respawn)."""
    return WorkerList(workers=[WorkerOut(id=w["id"], hostname=w["hostname"], queues=w["queues"],
                                         gpus=w["capabilities"].get("gpus", []),
                                         backends=w["capabilities"].get("backends", []),
                                         heartbeat_at=w["heartbeat_at"]) for w in svc.workers()],
                      embedded_worker=_embedded_worker(request))


@router.get("/healthz", tags=["ops"])
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
def readyz(request: Request, svc: Service) -> Response:
    """200 while the database and storage answer. ``embedded_worker`` (under `kiln serve`) says whether
    its worker runs or is being respawned; jobs submitted meanwhile wait queued."""
    try:
        svc.store.version("readyz-probe")
        svc.artifacts.root.mkdir(parents=True, exist_ok=True)
    except Exception as exc:  # database or storage down
        return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    body: dict = {"status": "ready", "workers": len(svc.workers())}
    embedded = _embedded_worker(request)
    if embedded is not None:
        body["embedded_worker"] = embedded
    return JSONResponse(body)


def _embedded_worker(request: Request) -> dict | None:
    supervisor = getattr(request.app.state.runtime, "supervisor", None)
    return supervisor.status() if supervisor is not None else None


@router.get("/metrics", response_class=PlainTextResponse, tags=["ops"],
            responses={401: {"description": "keyed server: missing or wrong metrics token"}})
def prometheus(request: Request, svc: Service, metrics: RequestMetrics,
               authorization: str | None = Header(default=None)) -> str:
    """Prometheus text. Its job counts span every tenant, so on a keyed server it needs
    ``Authorization: Bearer <KILN_METRICS_TOKEN>`` (tenant API keys do not open it)."""
    if keys_of(request).enabled:
        check_metrics_token(request.app.state.settings.metrics_token_hash(), authorization)
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


def check_metrics_token(metrics_hash: str | None, authorization: str | None) -> None:
    """401 unless ``authorization`` is ``Bearer <token>`` whose sha256 is the operator's metrics token hash."""
    presented = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else ""
    digest = hashlib.sha256(presented.encode()).hexdigest()
    if not (metrics_hash and presented and hmac.compare_digest(digest, metrics_hash)):
        raise Unauthenticated("/metrics needs the metrics token",
                              hint="send Authorization: Bearer <token>; the operator sets KILN_METRICS_TOKEN")

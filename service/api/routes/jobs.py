"""Jobs: submit, list, poll (the hot route), cancel, watch (server-sent events), report."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import StringConstraints

from service.domain import JobSpec
from service.domain.job import JobState
from service.domain.service import IDEMPOTENCY_KEY_PATTERN

from ..dependencies import Service, Tenant, tenant_of
from ..errors import ERROR_RESPONSES
from ..routing import DirectRoute  # also registers the job_id path convertor
from ..schemas import JobCreated, JobList, JobOut, links_for

router = APIRouter(tags=["jobs"])

# a label filter: a non-empty key, "=", then the value (possibly empty)
LabelFilter = Annotated[str, StringConstraints(pattern=r"^[^=]+=")]

# the headers GET /v1/jobs/{job_id} reads itself (OpenAPI parameters, as Header() would document them)
POLL_HEADERS = [{"name": name, "in": "header", "required": False, "schema": {"type": "string"}, "description": text}
                for name, text in (("authorization", "Bearer <API key>"), ("x-api-key", "API key (instead of Authorization)"),
                                   ("if-none-match", "an ETag from an earlier poll: 304 while the job is unchanged"))]


@router.post("/v1/jobs", status_code=202, response_model=JobCreated, responses=ERROR_RESPONSES)
def submit_job(spec: JobSpec, svc: Service, tenant: Tenant,
               idempotency_key: Annotated[str | None, Header(
                   alias="Idempotency-Key", min_length=1, max_length=256, pattern=IDEMPOTENCY_KEY_PATTERN,
                   description="1-256 printable ASCII characters: the same key and spec return the first job")] = None,
               ) -> JobCreated:
    """Queue a compilation. The same Idempotency-Key and spec return the first job (`created: false`)."""
    job, created = svc.submit(tenant, spec, idempotency_key)
    return JobCreated(id=job.id, state=job.state, created=created, links=links_for(job.id))


@router.get("/v1/jobs", response_model=JobList, responses=ERROR_RESPONSES)
def list_jobs(svc: Service, tenant: Tenant, state: JobState | None = None,
              label: Annotated[list[LabelFilter] | None, Query(description="key=value, repeatable")] = None,
              limit: Annotated[int, Query(ge=1, description="page size; more than the server's largest page "
                                                           "(KILN_PAGE_SIZE_MAX, 200) is served as that")] = 50,
              cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None) -> JobList:
    labels = dict(item.split("=", 1) for item in label or [])
    jobs, next_cursor = svc.list(tenant, state=state, labels=labels, limit=limit, cursor=cursor)
    return JobList(jobs=[JobOut.of(j) for j in jobs], next_cursor=next_cursor)


async def get_job(job_id: str, request: Request) -> Response:
    """The job's state, stage, progress, per-stage timings and cache hits, error and artifacts.
    Pollers may send the returned ETag as If-None-Match and get 304 while nothing changed."""
    # The hottest route, so a DirectRoute: its headers are read here rather than as Header()/Depends()
    # parameters (documented by POLL_HEADERS; the same key check as tenant_dep).
    tenant = tenant_of(request)
    # One indexed primary-key read that never blocks the event loop for a database round trip;
    # polls that arrive while a read is in flight share the next one (WHERE id = ANY(...)).
    job = await request.app.state.runtime.service.poll(tenant, job_id)
    etag = f'"{job.version}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    # serialised once by pydantic (the hot polling path skips FastAPI's second validation pass)
    return Response(JobOut.of(job).model_dump_json(), media_type="application/json", headers={"ETag": etag})


router.add_api_route("/v1/jobs/{job_id:job_id}", get_job, methods=["GET"], route_class_override=DirectRoute,
                     response_model=JobOut, responses={**ERROR_RESPONSES, 304: {"description": "unchanged (If-None-Match)"}},
                     openapi_extra={"parameters": POLL_HEADERS})


@router.post("/v1/jobs/{job_id}:cancel", response_model=JobOut, responses=ERROR_RESPONSES)
def cancel_job(job_id: str, svc: Service, tenant: Tenant) -> JobOut:
    return JobOut.of(svc.cancel(tenant, job_id))


@router.get("/v1/jobs/{job_id}/events", responses=ERROR_RESPONSES, response_class=StreamingResponse)
async def job_events(job_id: str, svc: Service, tenant: Tenant):
    """Server-sent events: one `job` event per change, then `end` at a terminal state."""
    await asyncio.to_thread(svc.get, tenant, job_id)  # 404 before the stream starts

    async def events():
        async for job in svc.watch(tenant, job_id):
            yield f"event: job\nid: {job.version}\ndata: {JobOut.of(job).model_dump_json()}\n\n"
        yield "event: end\ndata: {}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/v1/jobs/{job_id}/report", responses=ERROR_RESPONSES)
def job_report(job_id: str, svc: Service, tenant: Tenant) -> dict:
    """Stages with timings and cache hits, the spec, errors, and every artifact file with its sha256."""
    return svc.report(tenant, job_id)

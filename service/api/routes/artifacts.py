"""Artifacts of a job: the list, one artifact as a tar stream, one file (with single-range resume).

Served from their manifests only (no StaticFiles over storage), always as attachments."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from service.domain.errors import DomainError

from ..dependencies import Service, Tenant
from ..downloads import parse_range, stream_tar
from ..errors import ERROR_RESPONSES, error_response
from ..schemas import ArtifactList, ArtifactOut, ErrorOut

router = APIRouter(tags=["artifacts"])


@router.get("/v1/jobs/{job_id}/artifacts", response_model=ArtifactList, responses=ERROR_RESPONSES)
def list_artifacts(job_id: str, svc: Service, tenant: Tenant) -> ArtifactList:
    job = svc.get(tenant, job_id)
    out = []
    for ref in job.artifacts:
        stage, key, manifest = svc.artifact(tenant, job_id, ref.name)
        base = f"/v1/jobs/{job_id}/artifacts/{ref.name}"
        out.append(ArtifactOut(name=ref.name, stage=stage, key=key, bytes=manifest.get("bytes", 0),
                               files=manifest["files"], download=f"{base}/files/", archive=f"{base}.tar"))
    return ArtifactList(artifacts=out)


@router.get("/v1/jobs/{job_id}/artifacts/{name}.tar", responses=ERROR_RESPONSES, response_class=StreamingResponse)
def artifact_tar(job_id: str, name: str, svc: Service, tenant: Tenant):
    """The whole artifact as a tar stream (files + manifest.json)."""
    stage, key, manifest = svc.artifact(tenant, job_id, name)
    entries = [(f"{name}/{f['path']}", svc.artifact_file(tenant, job_id, name, f["path"])[0]) for f in manifest["files"]]
    entries.append((f"{name}/manifest.json", svc.artifacts.path(stage, key) / "manifest.json"))
    return StreamingResponse(stream_tar(entries), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{name}.tar"'})


@router.get("/v1/jobs/{job_id}/artifacts/{name}/files/{path:path}", responses={**ERROR_RESPONSES, 416: {"model": ErrorOut}},
            response_class=StreamingResponse)
def artifact_file(job_id: str, name: str, path: str, svc: Service, tenant: Tenant,
                  range_header: Annotated[str | None, Header(
                      alias="Range", description="one byte range: bytes=<start>-<end>, bytes=<start>- or "
                                                 "bytes=-<suffix length>")] = None):
    """One file of an artifact; honours a single `Range: bytes=` request (resume) with 206. Another unit, several
    ranges, or a range outside the file is a 416 with `Content-Range: bytes */<size>`."""
    file, entry = svc.artifact_file(tenant, job_id, name, path)
    size = entry["size"]
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{entry["sha256"]}"', "X-Content-SHA256": entry["sha256"],
               "Content-Disposition": f'attachment; filename="{Path(entry["path"]).name}"',
               "X-Content-Type-Options": "nosniff"}
    try:
        rng = parse_range(range_header, size)
    except DomainError as exc:
        return error_response(exc, {"Content-Range": f"bytes */{size}"})
    if rng is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(svc.artifacts.iter_file(file), media_type="application/octet-stream", headers=headers)
    start, end = rng
    headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
    return StreamingResponse(svc.artifacts.iter_file(file, start, end), status_code=206,
                             media_type="application/octet-stream", headers=headers)

"""The gRPC server: a thin adapter over JobService (same error table as REST), plus health and reflection.

``create_server(service, settings, port=0)`` returns ``(server, bound_port)``; start it with ``await server.start()``.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING, NoReturn

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from service.domain import JobService, JobSpec, error_body, status_for
from service.domain.errors import InvalidSpec
from service.domain.job import Job
from service.settings import Settings

from .auth import KeyRing
from .errors import BackendUnavailable, backend_down, describe


def load_stubs():
    try:
        pb2 = importlib.import_module("service.api.grpc_gen.kiln.v1.kiln_pb2")
        pb2_grpc = importlib.import_module("service.api.grpc_gen.kiln.v1.kiln_pb2_grpc")
    except ImportError:  # not generated yet (fresh checkout without `make proto`)
        from .gen_proto import generate

        generate()
        importlib.invalidate_caches()
        pb2 = importlib.import_module("service.api.grpc_gen.kiln.v1.kiln_pb2")
        pb2_grpc = importlib.import_module("service.api.grpc_gen.kiln.v1.kiln_pb2_grpc")
    return pb2, pb2_grpc


if TYPE_CHECKING:  # the generated modules themselves (Any where they have not been generated)
    from .grpc_gen.kiln.v1 import kiln_pb2 as pb2
    from .grpc_gen.kiln.v1 import kiln_pb2_grpc as pb2_grpc
else:
    pb2, pb2_grpc = load_stubs()
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Kiln"].full_name
CHUNK = 1 << 20


def spec_from_proto(msg) -> JobSpec:
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidSpec(f"invalid request: {describe(exc.errors())}", hint="proto/kiln/v1/kiln.proto and /docs "
                          "describe the JobSpec") from exc


def job_to_proto(job: Job):
    spec = pb2.JobSpec()
    json_format.ParseDict({k: v for k, v in job.spec.normalized().items() if v is not None}, spec)
    out = pb2.Job(id=job.id, state=job.state, stage=job.stage or "", progress=job.progress, message=job.message,
                  reason=job.reason, spec=spec, queue=job.queue, attempts=job.attempts, artifacts=[a.name for a in job.artifacts],
                  cancel_requested=job.cancel_requested, created_at=job.created_at, updated_at=job.updated_at,
                  started_at=job.started_at or 0.0, finished_at=job.finished_at or 0.0)
    if job.error:
        out.error.CopyFrom(pb2.Error(**job.error.model_dump()))
    for s in job.stages:
        stage = out.stages.add(name=s.name, state=s.state, key=s.key or "", cache_hit=s.cache_hit, seconds=s.seconds or 0.0)
        stage.summary.update(s.summary)
    return out


class KilnServicer(pb2_grpc.KilnServicer):
    def __init__(self, service: JobService, keys: KeyRing):
        self.svc = service
        self.keys = keys

    async def _call(self, context, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:
            await self._abort(context, exc)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
        body = error_body(BackendUnavailable(str(exc).splitlines()[0][:200]) if backend_down(exc) else exc)
        if body["code"] == "unavailable":  # the job store or broker is away: the client retries (UNAVAILABLE)
            body["message"] = "service temporarily unavailable: the job store or broker is away"
        _http, code = status_for(body["code"])
        context.set_trailing_metadata((("kiln-error-code", body["code"]), ("kiln-error-hint", body["hint"])))
        await context.abort(getattr(grpc.StatusCode, code), body["message"])
        raise AssertionError("ServicerContext.abort returned")  # it raises (grpc ships no type hints to say so)

    async def _tenant(self, context) -> str:
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        auth = md.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else md.get("x-api-key")
        try:
            return self.keys.tenant_for(key)
        except Exception as exc:
            await self._abort(context, exc)

    async def SubmitJob(self, request, context):
        tenant = await self._tenant(context)
        try:
            spec = spec_from_proto(request.spec)
        except InvalidSpec as exc:
            await self._abort(context, exc)
        job, created = await self._call(context, self.svc.submit, tenant, spec, request.idempotency_key or None)
        return pb2.SubmitJobResponse(id=job.id, state=job.state, created=created)

    async def GetJob(self, request, context):
        tenant = await self._tenant(context)
        return job_to_proto(await self._call(context, self.svc.get, tenant, request.id))

    async def ListJobs(self, request, context):
        tenant = await self._tenant(context)

        def run():
            return self.svc.list(tenant, state=request.state or None, labels=dict(request.labels),
                                 limit=request.limit or 50, cursor=request.cursor or None)

        jobs, cursor = await self._call(context, run)
        return pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_cursor=cursor or "")

    async def CancelJob(self, request, context):
        tenant = await self._tenant(context)
        return job_to_proto(await self._call(context, self.svc.cancel, tenant, request.id))

    async def WatchJob(self, request, context):
        tenant = await self._tenant(context)
        await self._call(context, self.svc.get, tenant, request.id)
        async for job in self.svc.watch(tenant, request.id):
            yield job_to_proto(job)

    async def ListArtifacts(self, request, context):
        tenant = await self._tenant(context)
        job = await self._call(context, self.svc.get, tenant, request.job_id)
        out = pb2.ListArtifactsResponse()
        for ref in job.artifacts:
            _stage, key, manifest = await self._call(context, self.svc.artifact, tenant, request.job_id, ref.name)
            out.artifacts.add(name=ref.name, key=key, bytes=manifest.get("bytes", 0),
                              files=[pb2.ArtifactFile(**f) for f in manifest["files"]])
        return out

    async def DownloadArtifact(self, request, context):
        tenant = await self._tenant(context)
        _stage, _key, manifest = await self._call(context, self.svc.artifact, tenant, request.job_id, request.name)
        paths = [request.path] if request.path else [f["path"] for f in manifest["files"]]
        for rel in paths:
            file, entry = await self._call(context, self.svc.artifact_file, tenant, request.job_id, request.name, rel)
            offset = request.offset if request.path else 0
            if offset < 0 or offset > entry["size"]:
                await self._abort(context, InvalidSpec(f"offset {offset} is outside {rel} ({entry['size']} bytes)"))
            with open(file, "rb") as f:
                f.seek(offset)
                while True:
                    data = await asyncio.to_thread(f.read, CHUNK)
                    eof = offset + len(data) >= entry["size"]
                    yield pb2.ArtifactChunk(path=rel, offset=offset, data=data, size=entry["size"], eof=eof,
                                            sha256=entry["sha256"] if eof else "")
                    offset += len(data)
                    if eof or not data:
                        break

    async def ListWorkers(self, request, context):
        await self._tenant(context)
        workers = await self._call(context, self.svc.workers)
        out = pb2.ListWorkersResponse()
        for w in workers:
            caps = w["capabilities"]
            out.workers.add(id=w["id"], hostname=w["hostname"], queues=w["queues"], backends=caps.get("backends", []),
                            gpus=[pb2.Gpu(**g) for g in caps.get("gpus", [])], heartbeat_at=w["heartbeat_at"])
        return out


async def create_server(service: JobService, settings: Settings, *, port: int = 0, host: str | None = None):
    """Build the asyncio server bound to ``host:port`` (0 = any free port). Returns (server, bound port)."""
    limit = settings.grpc_max_message_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", max(limit, 2 * CHUNK))])
    pb2_grpc.add_KilnServicer_to_server(KilnServicer(service, KeyRing(settings.api_key_hashes())), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host or settings.host}:{port}")
    return server, bound

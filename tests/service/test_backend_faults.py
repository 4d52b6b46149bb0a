"""Faults of the parts under the service, each found by ``benchmarks/chaos.py`` and fixed:

- PostgreSQL away (scenario 4): the API answered 500 (SQLAlchemy's OperationalError on the store, psycopg's on
  the status-poll path) and gRPC INTERNAL; now 503 with ``Retry-After`` and code ``unavailable`` (gRPC
  UNAVAILABLE), and it recovers by itself.
- Storage full (scenario 5): a stage that hits ENOSPC failed the job with ``internal`` and was retried onto the
  same full disk; now it fails at once with ``storage_full`` and its temporary output is gone.
"""

from __future__ import annotations

import errno

import pytest
from fastapi.testclient import TestClient

from benchmarks.chaos_backends import PrivatePostgres, missing
from service.api.app import create_app
from service.api.wiring import build_runtime
from service.domain import JobSpec
from service.settings import Settings
from service.store import ArtifactStore
from service.workers import pipeline
from service.workers.pipeline import PipelineRunner, Stage, register_stage


@pytest.mark.skipif(bool(missing()), reason=f"needs redis-server, initdb and pg_ctl: missing {', '.join(missing())}")
def test_api_answers_503_with_retry_after_while_postgresql_is_away_then_recovers(tmp_path):
    pg = PrivatePostgres(tmp_path).start()
    try:
        settings = Settings(storage=tmp_path / "storage", database_url=pg.url)
        runtime = build_runtime(settings)
        with TestClient(create_app(settings, runtime=runtime), raise_server_exceptions=False) as client:
            job = client.post("/v1/jobs", json={"model": "org/absent", "dtype": "float16"})
            assert job.status_code in (201, 202, 422), job.text  # the store answers (the model is not cached)
            listing = client.get("/v1/jobs")
            assert listing.status_code == 200
            pg.stop()
            for method, url in [("GET", "/v1/jobs"), ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000"),
                                ("GET", "/readyz"), ("GET", "/v1/workers"), ("GET", "/v1/jobs")]:
                r = client.request(method, url)
                assert r.status_code == 503, (url, r.status_code, r.text)
                assert r.headers.get("Retry-After") == "2", url
                if url != "/readyz":
                    assert r.json()["error"]["code"] == "unavailable" and "retry" in r.json()["error"]["hint"]
            assert _grpc_get_job_status(runtime, settings) == "UNAVAILABLE"  # not UNKNOWN/INTERNAL
            pg.start()
            assert client.get("/v1/jobs").status_code == 200  # the pool reconnects: no restart of the API
            assert client.get("/v1/jobs/00000000-0000-0000-0000-000000000000").status_code == 404
        runtime.close()
    finally:
        pg.close()


def _grpc_get_job_status(runtime, settings) -> str:
    import asyncio

    import grpc

    from service.api.grpc_server import create_server, pb2, pb2_grpc

    async def call() -> str:
        server, port = await create_server(runtime.service, settings, port=0, host="127.0.0.1")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    await pb2_grpc.KilnStub(channel).GetJob(pb2.GetJobRequest(id="00000000-0000-0000-0000-000000000000"))
                except grpc.aio.AioRpcError as err:
                    return err.code().name
                return "OK"
        finally:
            await server.stop(None)

    return asyncio.run(call())


@pytest.fixture
def enospc_stage():
    def fill(ctx, input_dir, output_dir, cfg, progress):
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "half.bin").write_bytes(b"\0" * 4096)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:  # as a library would: wrapped, the ENOSPC its cause
            raise RuntimeError("writing the checkpoint failed") from exc

    register_stage(Stage("fill", fill, config=lambda s: {} if s.labels.get("fill") else None))
    backup = list(pipeline.STAGES)
    pipeline.STAGES[:] = [s for s in pipeline.STAGES if s.name == "fill"]
    yield
    pipeline.STAGES[:] = [s for s in backup if s.name != "fill"]


def test_a_stage_out_of_space_fails_the_job_at_once_with_storage_full_and_leaves_no_temp(job_store, tmp_path,
                                                                                          enospc_stage):
    enqueued = []
    runner = PipelineRunner(Settings(storage=tmp_path, attempt_cap=3, heartbeat_s=0.2), job_store,
                            ArtifactStore(tmp_path), "w-test", enqueue=lambda *a: enqueued.append(a))
    job, _ = job_store.create(tenant="t", spec=JobSpec(model="org/m", labels={"fill": "1"}), idempotency_key=None,
                              queue="cpu")
    assert runner.run(job.id) == "failed"
    failed = job_store.get(job.id)
    assert failed.state == "failed" and failed.attempts == 1 and not enqueued  # not retried onto the full disk
    assert failed.error.code == "storage_full" and "fill stage" in failed.error.message
    assert "kiln gc" in failed.error.hint
    assert list((tmp_path / "stages" / "fill").iterdir()) == []  # the half-written output is gone


def test_storage_full_is_in_the_error_table():
    from service.domain import status_for

    assert status_for("storage_full") == (507, "RESOURCE_EXHAUSTED")

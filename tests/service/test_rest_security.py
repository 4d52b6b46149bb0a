"""REST edges in-process (real app, real SQLite, real pipeline): tenants, keys, paths, sizes, Range, tar, SSE."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.wiring import build_runtime
from service.domain import JobSpec
from service.settings import Settings, UnsafeConfiguration, hash_api_key
from service.workers.pipeline import PipelineRunner

from .conftest import TINY_REPO, install_in_hf_cache

ALICE, BOB = "alice-key-123", "bob-key-456"
METRICS = "metrics-token-789"


@pytest.fixture(scope="module")
def keyed_runtime(tmp_path_factory, tiny_model_dir):
    """A keyed service (alice, bob) with one finished job of alice's, run through the real pipeline."""
    root = tmp_path_factory.mktemp("keyed")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(storage=root, api_keys=f"alice:sha256:{hash_api_key(ALICE)},bob:{BOB}", max_body_bytes=4096,
                        metrics_token=METRICS)
    install_in_hf_cache(tiny_model_dir, settings.hf_cache, TINY_REPO)
    runtime = build_runtime(settings)
    job, _ = runtime.service.submit("alice", JobSpec(model=TINY_REPO, dtype="float16"))
    PipelineRunner(settings, runtime.service.store, runtime.service.artifacts, "inproc").run(job.id)
    yield settings, runtime, job.id
    runtime.close()
    mp.undo()


@pytest.fixture(scope="module")
def keyed(keyed_runtime):
    settings, runtime, job_id = keyed_runtime
    with TestClient(create_app(settings, runtime=runtime)) as client:
        yield client, job_id


def h(key):
    return {"Authorization": f"Bearer {key}"}


def routes(job_id):
    base = f"/v1/jobs/{job_id}"
    return [("GET", base), ("POST", f"{base}:cancel"), ("GET", f"{base}/events"), ("GET", f"{base}/artifacts"),
            ("GET", f"{base}/artifacts/checkpoint/files/config.json"), ("GET", f"{base}/artifacts/checkpoint.tar"),
            ("GET", f"{base}/report")]


def test_other_tenants_job_is_404_on_every_route(keyed):
    client, job_id = keyed
    for method, url in routes(job_id):
        assert client.request(method, url, headers=h(ALICE)).status_code in (200, 409), url
        r = client.request(method, url, headers=h(BOB))
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", url
    assert job_id not in [j["id"] for j in client.get("/v1/jobs", headers=h(BOB)).json()["jobs"]]


def test_no_key_or_wrong_key_is_401(keyed):
    client, job_id = keyed
    for method, url in routes(job_id) + [("GET", "/v1/jobs"), ("GET", "/v1/workers"), ("POST", "/v1/jobs")]:
        assert client.request(method, url).status_code == 401, url
        assert client.request(method, url, headers=h("nope")).status_code == 401, url
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", ["../../kiln.db", "..%2F..%2Fkiln.db", "%2Fetc%2Fpasswd", "a%2F..%2Fconfig.json", "manifest.json", "config.json%00"])
def test_path_traversal_in_artifact_paths_is_refused(keyed, path):
    client, job_id = keyed
    r = client.get(f"/v1/jobs/{job_id}/artifacts/checkpoint/files/{path}", headers=h(ALICE))
    assert r.status_code in (400, 404), (path, r.status_code)
    assert b"CREATE TABLE" not in r.content and b"root:" not in r.content


def test_oversized_body_is_413(keyed):
    client, _ = keyed
    spec = {"model": TINY_REPO, "labels": {"x": "y" * 100}, "padding": "z" * 10000}
    r = client.post("/v1/jobs", json=spec, headers=h(ALICE))
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunked():  # no Content-Length: counted while streaming
        yield b'{"model": "org/m", "labels": {"x": "'
        for _ in range(100):
            yield b"y" * 100
        yield b'"}}'

    r = client.post("/v1/jobs", content=chunked(), headers={**h(ALICE), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert client.get("/v1/nope", headers=h(ALICE)).json()["error"]["code"] == "not_found"


def test_range_download_resumes_and_matches_sha256(keyed):
    client, job_id = keyed
    files = client.get(f"/v1/jobs/{job_id}/artifacts", headers=h(ALICE)).json()["artifacts"][0]["files"]
    entry = next(f for f in files if f["path"] == "rank0.safetensors")
    url = f"/v1/jobs/{job_id}/artifacts/checkpoint/files/rank0.safetensors"
    head = client.get(url, headers={**h(ALICE), "Range": "bytes=0-999"})
    assert head.status_code == 206 and len(head.content) == 1000
    assert head.headers["content-range"] == f"bytes 0-999/{entry['size']}"
    tail = client.get(url, headers={**h(ALICE), "Range": "bytes=1000-"})
    assert tail.status_code == 206
    assert hashlib.sha256(head.content + tail.content).hexdigest() == entry["sha256"]
    assert client.get(url, headers={**h(ALICE), "Range": f"bytes={entry['size']}-"}).status_code == 416
    full = client.get(url, headers=h(ALICE))
    assert full.headers["content-disposition"].startswith("attachment")
    assert hashlib.sha256(full.content).hexdigest() == entry["sha256"]


def test_tar_stream_holds_every_file(keyed):
    client, job_id = keyed
    files = client.get(f"/v1/jobs/{job_id}/artifacts", headers=h(ALICE)).json()["artifacts"][0]["files"]
    r = client.get(f"/v1/jobs/{job_id}/artifacts/checkpoint.tar", headers=h(ALICE))
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = tar.getnames()
        for f in files:
            assert hashlib.sha256(tar.extractfile(f"checkpoint/{f['path']}").read()).hexdigest() == f["sha256"]
    assert "checkpoint/manifest.json" in names


def test_events_report_metrics_and_openapi(keyed):
    client, job_id = keyed
    events = client.get(f"/v1/jobs/{job_id}/events", headers=h(ALICE)).text
    assert "event: job" in events and '"state":"succeeded"' in events and "event: end" in events
    report = client.get(f"/v1/jobs/{job_id}/report", headers=h(ALICE)).json()
    assert [s["name"] for s in report["stages"]] == ["fetch", "convert", "publish"]
    assert report["artifacts"][0]["files"]
    # cross-tenant counts: a tenant key does not open /metrics, the operator's metrics token does
    for headers in ({}, h(ALICE), {"Authorization": "Bearer wrong"}):
        r = client.get("/metrics", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS}"}).text
    assert "kiln_http_requests_total" in metrics and 'kiln_jobs{state="succeeded"}' in metrics
    schema = client.get("/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}:cancel", "/v1/jobs/{job_id}/events",
                 "/v1/jobs/{job_id}/artifacts", "/v1/jobs/{job_id}/artifacts/{name}.tar",
                 "/v1/jobs/{job_id}/artifacts/{name}/files/{path}", "/v1/jobs/{job_id}/report", "/v1/workers"):
        assert path in schema["paths"], path
    assert schema["components"]["schemas"]["JobSpec"].get("examples")


def test_non_loopback_without_keys_refuses_to_start():
    with pytest.raises(UnsafeConfiguration):
        Settings(host="0.0.0.0").check_listen()
    Settings(host="127.0.0.1").check_listen()
    Settings(host="0.0.0.0", api_keys="t:k").check_listen()
    assert "k" not in Settings(api_keys="t:k").api_key_hashes()


def test_webhook_to_private_address_is_refused_at_submit(keyed):
    client, _ = keyed
    r = client.post("/v1/jobs", json={"model": TINY_REPO, "webhook_url": "http://127.0.0.1:9/hook"}, headers=h(ALICE))
    assert r.status_code == 400 and "private" in r.json()["error"]["message"]


def test_grpc_tenants_keys_resume_health_and_reflection(keyed_runtime):
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from service.api.grpc_server import create_server, pb2, pb2_grpc

    settings, runtime, job_id = keyed_runtime
    rank0 = runtime.service.artifact_file("alice", job_id, "checkpoint", "rank0.safetensors")[0].read_bytes()

    async def scenario():
        server, port = await create_server(runtime.service, settings, port=0, host="127.0.0.1")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb2_grpc.KilnStub(channel)
                alice, bob = (("authorization", f"Bearer {ALICE}"),), (("authorization", f"Bearer {BOB}"),)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetJob(pb2.GetJobRequest(id=job_id))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                calls = [
                    lambda md: stub.GetJob(pb2.GetJobRequest(id=job_id), metadata=md),
                    lambda md: stub.CancelJob(pb2.CancelJobRequest(id=job_id), metadata=md),
                    lambda md: stub.ListArtifacts(pb2.ListArtifactsRequest(job_id=job_id), metadata=md),
                ]
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(bob)
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                for stream in (stub.WatchJob(pb2.WatchJobRequest(id=job_id), metadata=bob),
                               stub.DownloadArtifact(pb2.DownloadArtifactRequest(job_id=job_id, name="checkpoint"), metadata=bob)):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for _ in stream:
                            pass
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                assert job_id not in [j.id for j in (await stub.ListJobs(pb2.ListJobsRequest(), metadata=bob)).jobs]
                # alice resumes a download from an offset; the last chunk carries the file's sha256
                data, digest = b"", ""
                async for chunk in stub.DownloadArtifact(pb2.DownloadArtifactRequest(
                        job_id=job_id, name="checkpoint", path="rank0.safetensors", offset=1000), metadata=alice):
                    data += chunk.data
                    digest = chunk.sha256 or digest
                assert data == rank0[1000:] and digest == hashlib.sha256(rank0).hexdigest()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetJob(pb2.GetJobRequest(id="../../etc"), metadata=alice)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="kiln.v1.Kiln"))
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                refl = reflection_pb2_grpc.ServerReflectionStub(channel)
                async for resp in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                    names = [s.name for s in resp.list_services_response.service]
                    assert "kiln.v1.Kiln" in names and "grpc.health.v1.Health" in names
                    break
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_poll_route_keys_etag_metrics_and_documented_headers(keyed):
    client, job_id = keyed
    url = f"/v1/jobs/{job_id}"
    first = client.get(url, headers={"X-API-Key": ALICE})
    assert first.status_code == 200 and first.json()["id"] == job_id and first.json()["state"] == "succeeded"
    assert first.json()["links"]["self"] == url and "tenant" not in first.json()
    etag = first.headers["ETag"]
    assert client.get(url, headers={**h(ALICE), "If-None-Match": etag}).status_code == 304
    assert client.get(url, headers={**h(ALICE), "If-None-Match": '"0"'}).status_code == 200
    assert client.get(url, headers={"X-API-Key": BOB}).status_code == 404
    assert client.get(url, headers={"Authorization": f"Basic {ALICE}"}).status_code == 401
    assert client.post(url, headers=h(ALICE)).status_code == 405
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS}"}).text
    assert 'route="/v1/jobs/{job_id}",status="304"' in metrics
    op = client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}"]["get"]
    assert {(p["name"], p["in"]) for p in op["parameters"]} == {
        ("job_id", "path"), ("authorization", "header"), ("x-api-key", "header"), ("if-none-match", "header")}
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobOut")


def test_direct_route_refuses_endpoints_it_cannot_call():
    from fastapi import Request

    from service.api.routing import DirectRoute

    async def needs_query(job_id: str, request: Request, limit: int = 5): ...

    async def no_request(job_id: str): ...

    async def typed_path(job_id: int, request: Request): ...

    for endpoint in (needs_query, no_request, typed_path):
        with pytest.raises(TypeError):
            DirectRoute("/v1/jobs/{job_id}", endpoint, methods=["GET"])


@pytest.mark.parametrize("header", ["bytes=0-9,20-29", "bytes=0-0, -1", "items=0-9", "bytes 0-9", "octets=0-",
                                    "bytes=abc-", "bytes=+5-9", "bytes=5", "bytes=-0", "bytes=10-5"])
def test_ranges_it_cannot_serve_are_416_never_the_whole_file(keyed, header):
    client, job_id = keyed
    files = client.get(f"/v1/jobs/{job_id}/artifacts", headers=h(ALICE)).json()["artifacts"][0]["files"]
    size = next(f for f in files if f["path"] == "rank0.safetensors")["size"]
    r = client.get(f"/v1/jobs/{job_id}/artifacts/checkpoint/files/rank0.safetensors",
                   headers={**h(ALICE), "Range": header})
    assert r.status_code == 416, (header, r.status_code, len(r.content))
    assert r.headers["content-range"] == f"bytes */{size}"
    body = r.json()["error"]
    assert body["code"] == "range_not_satisfiable" and body["hint"], body

"""Hostile HTTP against a real uvicorn server (``kiln serve``'s own configuration, ``uvicorn_config``) on a free
port, with raw sockets so that nothing normalizes the request on the way: encoded ``..`` (single and double),
absolute paths, NUL, backslashes, > 4 KiB names, 1000 Range parts, oversized bodies, slowloris headers and
bodies. Then tenants: every REST route (walked from ``app.routes``, so a new route is covered without editing
this file) and every gRPC method (walked from the service descriptor) probed with another tenant's job ids,
artifact names and cursors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.cli import uvicorn_config
from service.api.wiring import build_runtime
from service.domain import JobSpec
from service.settings import Settings, hash_api_key
from service.workers.pipeline import PipelineRunner

from .conftest import TINY_REPO, install_in_hf_cache
from .harness import free_port

ALICE, BOB = "alice-key-123", "bob-key-456"
SECRET_LABEL = "alice-only-7f3c"  # a value only alice's jobs carry: it must never reach bob
BOB_SPEC = {"model": TINY_REPO, "dtype": "float16", "labels": {"owner": "bob"}}  # bob's submit, with alice's key


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, tiny_model_dir):
    """A keyed service: alice has one finished job (checkpoint artifact) and two queued ones; bob one queued."""
    root = tmp_path_factory.mktemp("hostile-http")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(storage=root, api_keys=f"alice:sha256:{hash_api_key(ALICE)},bob:{BOB}", max_body_bytes=4096,
                        request_header_timeout_s=1.0, request_body_timeout_s=1.0)
    install_in_hf_cache(tiny_model_dir, settings.hf_cache, TINY_REPO)
    runtime = build_runtime(settings)
    svc = runtime.service
    job, _ = svc.submit("alice", JobSpec(model=TINY_REPO, dtype="float16", labels={"owner": SECRET_LABEL}),
                        idempotency_key="shared-key")
    PipelineRunner(settings, svc.store, svc.artifacts, "inproc").run(job.id)
    for _ in range(2):
        svc.store.create(tenant="alice", spec=JobSpec(model="org/alice-model", labels={"owner": SECRET_LABEL}),
                         idempotency_key=None, queue="cpu")
    bob_job, _ = svc.store.create(tenant="bob", spec=JobSpec(model="org/bob-model"), idempotency_key=None, queue="cpu")
    cursor = svc.list("alice", limit=1)[1]
    files = svc.artifact("alice", job.id, "checkpoint")[2]["files"]
    # what bob must never see: alice's label, her files' hashes, her artifact's stage key, her other jobs' ids
    secrets = {SECRET_LABEL, *(f["sha256"] for f in files), *(a.key for a in svc.get("alice", job.id).artifacts),
               *(j.id for j in svc.list("alice", limit=10)[0])} - {job.id}  # (the probes send job.id itself)
    yield {"settings": settings, "runtime": runtime, "job": job.id, "bob_job": bob_job.id, "cursor": cursor,
           "secrets": secrets, "files": files}
    runtime.close()
    mp.undo()


@pytest.fixture(scope="module")
def live(tenants):
    """The app under uvicorn with kiln serve's configuration, in a thread, on a free port."""
    import uvicorn

    app = create_app(tenants["settings"], runtime=tenants["runtime"])
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, tenants["settings"], host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``data`` as is; (status, body) of the answer (0 when the server closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    if not out:
        return 0, b""
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def get(port: int, target: bytes, headers: bytes = b"") -> tuple[int, bytes]:
    auth = f"Authorization: Bearer {ALICE}\r\n".encode()
    return raw(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + auth + headers + b"Connection: close\r\n\r\n")


PATHS = [
    b"..%2F..%2Fkiln.db", b"%2e%2e/%2e%2e/kiln.db", b"%2e%2e%2f%2e%2e%2fkiln.db", b"%252e%252e%252fkiln.db",
    b"..%252f..%252fkiln.db", b"%2fetc%2fpasswd", b"/etc/passwd", b"//etc/passwd", b"..\\..\\kiln.db",
    b"..%5c..%5ckiln.db", b"%5cetc%5cpasswd", b"config.json%00", b"config.json%00.txt", b"%00", b"./config.json",
    b"rank0.safetensors/../config.json", b"manifest.json", b"../manifest.json", b"%2e%2e", b"config.json/",
    b"a" * 5000, b"%61" * 2000, (b"x/" * 2100) + b"config.json", "ü/../config.json".encode(),
]


@pytest.mark.parametrize("path", PATHS, ids=[p[:40].decode("latin-1") for p in PATHS])
def test_path_abuse_on_artifact_routes_never_serves_outside_the_manifest(tenants, live, path):
    job = tenants["job"].encode()
    for target in (b"/v1/jobs/" + job + b"/artifacts/checkpoint/files/" + path,
                   b"/v1/jobs/" + job + b"/artifacts/" + path + b".tar",
                   b"/v1/jobs/" + job + b"/artifacts/" + path + b"/files/config.json",
                   b"/v1/jobs/" + path + b"/artifacts"):
        status, body = get(live, target)
        assert status in (400, 404, 414, 431), (target[:120], status)
        assert b"CREATE TABLE" not in body and b"root:" not in body and b"SQLite" not in body
        if status in (400, 404) and body.startswith(b"{"):  # (uvicorn itself answers a non-ASCII target: plain 400)
            error = json.loads(body)["error"]
            assert error["code"] and error["hint"], error


def test_many_range_parts_and_huge_range_headers_are_416(tenants, live):
    url = f"/v1/jobs/{tenants['job']}/artifacts/checkpoint/files/config.json".encode()
    many = ",".join(f"{i}-{i}" for i in range(1000)).encode()
    for rng in (b"bytes=" + many, b"bytes=" + b"9" * 3000 + b"-", b"bytes=0-0," * 500):
        status, body = get(live, url, b"Range: " + rng + b"\r\n")
        assert status == 416, (rng[:40], status)
        assert json.loads(body)["error"]["code"] == "range_not_satisfiable"


def test_body_over_the_limit_is_413_without_reading_it(live):
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000000\r\nConnection: close\r\n\r\n").encode()
    start = time.monotonic()
    status, body = raw(live, head + b'{"model": "')
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert time.monotonic() - start < 2


def _trickle(port: int, head: bytes, drip: bytes, interval: float, limit: float) -> tuple[float, bytes]:
    """Send ``head``, then ``drip`` one byte per ``interval``; (seconds until the server answered or closed, answer)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=limit)
    start = time.monotonic()
    try:
        s.sendall(head)
        s.settimeout(interval)
        answer = b""
        for byte in drip:
            try:
                chunk = s.recv(65536)
                if not chunk:
                    break  # closed
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
            except TimeoutError:
                pass
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            if time.monotonic() - start > limit:
                break
        return time.monotonic() - start, answer
    finally:
        s.close()


def _others_are_served(port: int, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        start = time.monotonic()
        status, _ = raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200
        latencies.append(time.monotonic() - start)
        time.sleep(0.05)


def test_slowloris_body_and_headers_are_cut_off_while_others_are_served(live):
    """kiln serve's uvicorn: a body trickled at 1 byte / 0.2 s gets a 408 at the 1 s body deadline and the
    connection is closed; headers trickled the same way get the connection closed at the 1 s header deadline.
    Meanwhile /healthz keeps answering promptly."""
    stop, latencies = threading.Event(), []
    prober = threading.Thread(target=_others_are_served, args=(live, stop, latencies))
    prober.start()
    try:
        head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n").encode()
        seconds, answer = _trickle(live, head, b'{"model": "' + b"a" * 150, 0.2, 8)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer and 0.8 < seconds < 4, seconds
        seconds, answer = _trickle(live, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 100, 0.2, 8)
        assert answer == b"" and 0.8 < seconds < 4, (seconds, answer[:100])  # closed without an answer
    finally:
        stop.set()
        prober.join()
    assert latencies and max(latencies) < 1.0, latencies


def test_a_prompt_body_is_not_cut_off(live):
    """The deadlines do not touch ordinary requests: a chunked body sent at once is served (here: 400/422)."""
    body = json.dumps({"model": "org/not-cached"}).encode()
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    status, answer = raw(live, head + body)
    assert status in (202, 422), answer


# -- tenants -------------------------------------------------------------------------------------------------------

PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/", "/metrics"}


def _probe_url(template: str, values: dict[str, str]) -> str:
    def fill(match):
        name = match.group(1).split(":")[0]
        assert name in values, f"route {template}: add a probe value for path parameter {name!r}"
        return values[name]
    return re.sub(r"\{([^}]+)\}", fill, template)


def _no_secret(body: bytes, secrets: set[str], where: str) -> None:
    for secret in secrets:
        assert secret.encode() not in body, f"{where}: leaks {secret!r}"


def test_every_rest_route_hides_another_tenants_jobs(tenants):
    from starlette.routing import Mount, Route

    alice_job, secrets = tenants["job"], tenants["secrets"]
    values = {"job_id": alice_job, "name": "checkpoint", "path": "config.json"}
    app = create_app(tenants["settings"], runtime=tenants["runtime"])
    probed = 0
    with TestClient(app) as client:
        bob = {"Authorization": f"Bearer {BOB}", "Idempotency-Key": "shared-key"}
        for route in app.routes:
            if isinstance(route, Mount):
                assert route.path in ("/static/docs", "/dashboard"), f"new mount {route.path}: probe it"
                continue
            assert isinstance(route, Route)
            if route.path in PUBLIC:
                continue
            for method in sorted(route.methods or ()):
                if method == "HEAD":
                    continue
                url = _probe_url(route.path, values)
                kwargs = {"json": BOB_SPEC} \
                    if method == "POST" and "{" not in route.path else {}
                for query in ("", f"?cursor={tenants['cursor']}", "?label=owner%3D" + SECRET_LABEL):
                    r = client.request(method, url + query, headers=bob, **kwargs)
                    probed += 1
                    where = f"{method} {url}{query} as bob -> {r.status_code}"
                    assert r.status_code < 500, where
                    _no_secret(r.content, secrets, where)
                    if "{job_id" in route.path:
                        assert r.status_code in (404, 405), where
                        assert r.json()["error"]["code"] in ("job_not_found", "method_not_allowed"), where
                    elif r.status_code == 200 and route.path == "/v1/jobs":  # bob's own jobs only
                        assert tenants["bob_job"] in r.text or query, where
                    elif r.status_code == 202:  # bob's submit with alice's Idempotency-Key: a job of bob's own
                        assert r.json()["id"] != alice_job, where
                    if query:
                        break  # the path routes ignore queries: one probe with them is enough
        # alice's own view still works (the probes are meaningful)
        assert client.get(f"/v1/jobs/{alice_job}", headers={"Authorization": f"Bearer {ALICE}"}).status_code == 200
    print(f"REST tenant probes: {probed}")
    assert probed >= 12


def test_every_grpc_method_hides_another_tenants_jobs(tenants):
    import grpc
    from google.protobuf import json_format

    from service.api.grpc_server import create_server, pb2

    alice_job, secrets = tenants["job"], tenants["secrets"]
    fill = {"id": alice_job, "job_id": alice_job, "name": "checkpoint", "path": "config.json",
            "cursor": tenants["cursor"], "idempotency_key": "shared-key"}
    service = pb2.DESCRIPTOR.services_by_name["Kiln"]

    async def scenario():
        server, port = await create_server(tenants["runtime"].service, tenants["settings"], port=0, host="127.0.0.1")
        await server.start()
        results = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for method in service.methods:
                    request = pb2.__dict__[method.input_type.name]()
                    for field in method.input_type.fields:
                        if field.name in fill:
                            setattr(request, field.name, fill[field.name])
                    if method.input_type.name == "SubmitJobRequest":
                        json_format.ParseDict(BOB_SPEC, request.spec)
                    path = f"/{service.full_name}/{method.name}"
                    call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(
                        path, request_serializer=lambda m: m.SerializeToString(),
                        response_deserializer=lambda b: b)
                    md = (("authorization", f"Bearer {BOB}"),)
                    try:
                        if method.server_streaming:
                            body = b"".join([chunk async for chunk in call(request, metadata=md, timeout=5)])
                        else:
                            body = await call(request, metadata=md, timeout=5)
                        code = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as err:
                        body, code = (err.details() or "").encode(), err.code()
                    results[method.name] = code
                    _no_secret(body, secrets, f"{method.name} as bob")
                    assert alice_job.encode() not in body or code != grpc.StatusCode.OK, method.name
        finally:
            await server.stop(None)
        return results

    results = asyncio.run(scenario())
    assert set(results) == {m.name for m in service.methods}
    for name, code in results.items():
        if name in ("ListJobs", "ListWorkers", "SubmitJob"):
            assert code == grpc.StatusCode.OK, (name, code)
        else:
            assert code == grpc.StatusCode.NOT_FOUND, (name, code)


def test_artifact_bytes_served_match_the_manifest(tenants, live):
    """Sanity of the probes above: alice gets her file, whole and by range, with the manifest's sha256."""
    entry = next(f for f in tenants["files"] if f["path"] == "config.json")
    status, body = get(live, f"/v1/jobs/{tenants['job']}/artifacts/checkpoint/files/config.json".encode())
    assert status == 200 and hashlib.sha256(body).hexdigest() == entry["sha256"]


def test_grpc_download_path_abuse_returns_no_bytes(tenants):
    """DownloadArtifact with the same path tricks (decoded: gRPC strings are not URL-encoded) and names."""
    import grpc

    from service.api.grpc_server import create_server, pb2, pb2_grpc

    tricks = ["../../kiln.db", "/etc/passwd", "..\\..\\kiln.db", "config.json\x00", "manifest.json", "./config.json",
              "rank0.safetensors/../config.json", "a" * 5000, "%2e%2e/kiln.db", "..", "/"]

    async def scenario():
        server, port = await create_server(tenants["runtime"].service, tenants["settings"], port=0, host="127.0.0.1")
        await server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb2_grpc.KilnStub(channel)
                md = (("authorization", f"Bearer {ALICE}"),)
                for name, path in [("checkpoint", t) for t in tricks] + [(t, "config.json") for t in tricks]:
                    data = b""
                    try:
                        async for chunk in stub.DownloadArtifact(pb2.DownloadArtifactRequest(
                                job_id=tenants["job"], name=name, path=path), metadata=md, timeout=5):
                            data += chunk.data
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as err:
                        codes.append(err.code())
                    assert data == b"", (name, path)
        finally:
            await server.stop(None)
        return codes

    codes = asyncio.run(scenario())
    assert set(codes) <= {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}, codes

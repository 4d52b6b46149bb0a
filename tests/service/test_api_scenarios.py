"""The same job scenarios over REST and gRPC against one real `kiln serve` (API + gRPC + Celery worker)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import httpx
import pytest

from .conftest import TINY_REPO, WEIRD_REPO


class ApiError(Exception):
    def __init__(self, status, code):
        super().__init__(f"{status} {code}")
        self.status, self.code = status, code


class Rest:
    name = "rest"

    def __init__(self, url):
        self.http = httpx.Client(base_url=url, timeout=30)

    def _check(self, r):
        if r.status_code >= 400:
            raise ApiError(r.status_code, r.json()["error"]["code"])
        return r.json()

    def submit(self, spec, key=None):
        body = self._check(self.http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key} if key else {}))
        return body["id"], body["created"]

    def get(self, job_id):
        return self._check(self.http.get(f"/v1/jobs/{job_id}"))

    def list(self, **labels):
        params = [("label", f"{k}={v}") for k, v in labels.items()]
        return [j["id"] for j in self._check(self.http.get("/v1/jobs", params=params))["jobs"]]

    def cancel(self, job_id):
        return self._check(self.http.post(f"/v1/jobs/{job_id}:cancel"))["state"]

    def watch(self, job_id):
        import json

        states = []
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            for line in r.iter_lines():
                if line.startswith("data: {\""):
                    states.append(json.loads(line[6:])["state"])
        return states

    def download(self, job_id, out: Path):
        files = {}
        for art in self._check(self.http.get(f"/v1/jobs/{job_id}/artifacts"))["artifacts"]:
            for f in art["files"]:
                r = self.http.get(f"/v1/jobs/{job_id}/artifacts/{art['name']}/files/{f['path']}")
                assert r.status_code == 200
                files[f["path"]] = (hashlib.sha256(r.content).hexdigest(), f["sha256"])
        return files


class Grpc:
    name = "grpc"

    def __init__(self, target):
        from service.api.grpc_server import pb2, pb2_grpc

        self.pb2 = pb2
        self.stub = pb2_grpc.KilnStub(grpc.insecure_channel(target))

    def _call(self, fn, req):
        try:
            return fn(req, timeout=120)
        except grpc.RpcError as exc:
            md = dict(exc.trailing_metadata() or ())
            raise ApiError(exc.code().name, md.get("kiln-error-code")) from None

    def submit(self, spec, key=None):
        from google.protobuf import json_format

        msg = self.pb2.JobSpec()
        try:
            json_format.ParseDict(spec, msg)
        except json_format.ParseError:
            raise ApiError("INVALID_ARGUMENT", "client_parse") from None
        r = self._call(self.stub.SubmitJob, self.pb2.SubmitJobRequest(spec=msg, idempotency_key=key or ""))
        return r.id, r.created

    def get(self, job_id):
        from google.protobuf import json_format

        return json_format.MessageToDict(self._call(self.stub.GetJob, self.pb2.GetJobRequest(id=job_id)),
                                         preserving_proto_field_name=True)

    def list(self, **labels):
        return [j.id for j in self._call(self.stub.ListJobs, self.pb2.ListJobsRequest(labels=labels)).jobs]

    def cancel(self, job_id):
        return self._call(self.stub.CancelJob, self.pb2.CancelJobRequest(id=job_id)).state

    def watch(self, job_id):
        try:
            return [j.state for j in self.stub.WatchJob(self.pb2.WatchJobRequest(id=job_id), timeout=120)]
        except grpc.RpcError as exc:
            raise ApiError(exc.code().name, dict(exc.trailing_metadata() or ()).get("kiln-error-code")) from None

    def download(self, job_id, out: Path):
        files, buffers = {}, {}
        for art in self._call(self.stub.ListArtifacts, self.pb2.ListArtifactsRequest(job_id=job_id)).artifacts:
            for chunk in self.stub.DownloadArtifact(self.pb2.DownloadArtifactRequest(job_id=job_id, name=art.name)):
                buffers.setdefault(chunk.path, hashlib.sha256()).update(chunk.data)
                if chunk.eof:
                    files[chunk.path] = (buffers[chunk.path].hexdigest(), chunk.sha256)
        return files


@pytest.fixture(params=["rest", "grpc"])
def api(request, server):
    return Rest(server["http"]) if request.param == "rest" else Grpc(server["grpc"])


def test_submit_watch_list_download_verifies_checksums(api, tmp_path):
    job_id, created = api.submit({"model": TINY_REPO, "dtype": "float16", "labels": {"via": api.name}})
    assert created
    states = api.watch(job_id)
    assert states[-1] == "succeeded", api.get(job_id)
    job = api.get(job_id)
    assert job["progress"] == 1.0 and job["artifacts"] == ["checkpoint"]
    assert job_id in api.list(via=api.name)
    files = api.download(job_id, tmp_path)
    assert {"config.json", "rank0.safetensors"} <= set(files)
    assert all(got == want for got, want in files.values())


def test_idempotent_resubmission_returns_the_same_job(api):
    spec = {"model": TINY_REPO, "dtype": "bfloat16"}
    first, created = api.submit(spec, key=f"idem-{api.name}")
    second, created_again = api.submit(spec, key=f"idem-{api.name}")
    assert created and not created_again and first == second
    with pytest.raises(ApiError) as err:
        api.submit({**spec, "dtype": "float32"}, key=f"idem-{api.name}")
    assert err.value.code == "idempotency_conflict"


def test_cancel_a_running_job(api):
    job_id, _ = api.submit({"model": TINY_REPO, "labels": {"slow": "30"}})
    import time

    deadline = time.monotonic() + 60
    while api.get(job_id)["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    api.cancel(job_id)
    assert api.watch(job_id)[-1] == "cancelled"


BAD_SPECS = {
    "malformed spec": {"model": TINY_REPO, "dtype": "float8"},
    "unknown field": {"model": TINY_REPO, "colour": "blue"},
    "url as model": {"model": "https://evil.example/x"},
    "unknown repo offline": {"model": "kiln-test/does-not-exist"},
    "unsupported architecture": {"model": WEIRD_REPO},
    "tp does not divide heads": {"model": TINY_REPO, "mapping": {"tp_size": 3}},
    "unknown backend": {"model": TINY_REPO, "build": {"backend": "tpu-magic"}},
    "target no worker serves": {"model": TINY_REPO, "build": {"target": "sm90", "max_input_len": 64, "max_seq_len": 128}},
    "backend no worker has": {"model": TINY_REPO, "build": {"backend": "tensorrt", "max_input_len": 64, "max_seq_len": 128}},
    "unknown quantization algo": {"model": TINY_REPO, "quantization": {"algo": "INT3"}},
    "fp8 on an sm80 target": {"model": TINY_REPO, "quantization": {"algo": "FP8"}, "build": {"target": "sm80"}},
    "smoothquant engine the backend cannot build": {"model": TINY_REPO, "quantization": {"algo": "W8A8_SQ_PER_CHANNEL"},
                                                    "build": {"max_input_len": 64, "max_seq_len": 128}},
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_input_is_refused_and_nothing_is_written(api, case):
    before = api.list()
    with pytest.raises(ApiError) as err:
        api.submit(BAD_SPECS[case])
    assert err.value.status in (400, 422, "INVALID_ARGUMENT"), err.value
    assert api.list() == before


def test_unknown_job_is_not_found(api):
    with pytest.raises(ApiError) as err:
        api.get("00000000-0000-0000-0000-000000000000")
    assert err.value.status in (404, "NOT_FOUND")

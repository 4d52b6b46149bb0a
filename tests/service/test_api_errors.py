"""REST error bodies: no framework wording, labelled positions, and a non-empty hint on every error."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.wiring import build_runtime
from service.settings import Settings

BAD_MODEL = "model: model must be a Hugging Face repo id such as 'org/name' (no URLs or paths)"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(storage=tmp_path_factory.mktemp("errors"))
    runtime = build_runtime(settings)
    with TestClient(create_app(settings, runtime=runtime)) as c:
        yield c
    runtime.close()


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"code", "message", "hint"} and body["hint"].strip(), body
    return body


def test_a_bad_model_id_has_the_validators_message_without_pydantics_prefix(client):
    body = error(client.post("/v1/jobs", json={"model": "https://evil.example/model"}), 400)
    assert body == {"code": "invalid_argument", "message": f"invalid request: {BAD_MODEL}",
                    "hint": "see /docs for the JobSpec schema"}


def test_grpc_spec_errors_have_no_prefix_either():
    from service.api.grpc_server import pb2, spec_from_proto
    from service.domain.errors import InvalidSpec

    with pytest.raises(InvalidSpec) as err:
        spec_from_proto(pb2.JobSpec(model="bad id!"))
    assert err.value.message == f"invalid request: {BAD_MODEL}" and err.value.hint


def test_json_decode_errors_name_their_position(client):
    r = client.post("/v1/jobs", content=b'{"model": "a/b",,}', headers={"Content-Type": "application/json"})
    body = error(r, 400)
    assert body["message"] == ("invalid request: body: JSON decode error at character 16: "
                               "Expecting property name enclosed in double quotes")
    assert body["hint"] == "send the JobSpec as one JSON object (Content-Type: application/json)"


def test_positions_are_labelled_by_where_they_are(client):
    body = error(client.post("/v1/jobs", json={"model": "a/b", "mapping": {"tp_size": 0}}), 400)
    assert body["message"] == "invalid request: mapping.tp_size: Input should be greater than or equal to 1"
    body = error(client.get("/v1/jobs", params={"limit": "x"}), 400)
    assert body["message"].startswith("invalid request: query parameter limit: Input should be a valid integer")
    assert body["hint"] == "see /docs for this route's parameters"


@pytest.mark.parametrize("method,url,kwargs,status,code", [
    ("POST", "/v1/jobs", {"content": b""}, 400, "invalid_argument"),
    ("POST", "/v1/jobs", {"json": {"model": "a/b"}, "headers": {"Idempotency-Key": "x" * 300}}, 400, "invalid_argument"),
    ("GET", "/v1/jobs?label=nokey", {}, 400, "invalid_argument"),
    ("GET", "/v1/jobs?limit=0", {}, 400, "invalid_argument"),
    ("GET", "/v1/jobs?state=nope", {}, 400, "invalid_argument"),
    ("GET", "/v1/jobs?cursor=zzz", {}, 400, "invalid_argument"),
    ("GET", "/v1/jobs/nope", {}, 404, "job_not_found"),
    ("POST", "/v1/jobs/nope:cancel", {}, 404, "job_not_found"),
    ("GET", "/v1/jobs/nope/artifacts/checkpoint/files/a", {}, 404, "job_not_found"),
    ("GET", "/v1/nothing-here", {}, 404, "not_found"),
    ("DELETE", "/v1/jobs", {}, 405, "method_not_allowed"),
])
def test_every_error_has_a_hint(client, method, url, kwargs, status, code):
    assert error(client.request(method, url, **kwargs), status)["code"] == code


def test_a_model_missing_from_the_cache_gets_the_services_own_hint(client, monkeypatch):
    """The compiler's hint ("pass a local Hugging Face folder") is one the service itself refuses: the
    service's says how to get the repo into its cache (offline) or what token reference it needs (online)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    body = error(client.post("/v1/jobs", json={"model": "kiln-test/not-in-the-cache", "revision": "v2"}), 422)
    assert body["code"] == "model_not_found" and "kiln-test/not-in-the-cache" in body["message"]
    assert "local Hugging Face folder" not in body["hint"]
    cache = str(client.app.state.runtime.settings.hf_cache)
    assert f"huggingface-cli download kiln-test/not-in-the-cache --revision v2 --cache-dir {cache}" in body["hint"]
    assert "unset HF_HUB_OFFLINE" in body["hint"]


def test_the_online_model_not_found_hint_names_the_token_reference(tmp_path):
    from service.compiler.errors import ModelNotFound
    from service.domain import JobSpec
    from service.workers.stages import model_not_found_hint

    spec = JobSpec(model="org/gated")
    hint = model_not_found_hint(Settings(storage=tmp_path), spec, downloading=True)
    assert "private or gated repo needs a Hugging Face token" in hint and "KILN_HF_TOKEN_ENV" in hint
    hint = model_not_found_hint(Settings(storage=tmp_path, hf_token_file=tmp_path / "tok"), spec, downloading=True)
    assert "KILN_HF_TOKEN_FILE reference" in hint
    assert ModelNotFound("x").hint.startswith("pass a local")  # the compiler's own hint stays for the CLI

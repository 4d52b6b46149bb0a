"""The OpenAPI schema says what the server enforces: label filters, Idempotency-Key, state, limit, and the Allow
header of a 405 (OPTIONS included) lists exactly the methods the schema documents for that path."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.wiring import build_runtime
from service.settings import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(storage=tmp_path_factory.mktemp("conformance"), page_size_max=3)
    runtime = build_runtime(settings)
    with TestClient(create_app(settings, runtime=runtime)) as c:
        yield c
    runtime.close()


@pytest.fixture(scope="module")
def schema(client):
    return client.get("/openapi.json").json()


def parameter(schema, path, method, name):
    return next(p for p in schema["paths"][path][method]["parameters"] if p["name"] == name)


def test_label_filter_needs_a_key_and_an_equals_sign_in_schema_and_server(client, schema):
    items = parameter(schema, "/v1/jobs", "get", "label")["schema"]["anyOf"][0]["items"]
    assert items == {"type": "string", "pattern": "^[^=]+="}
    for bad in ("", "team", "=search"):
        r = client.get("/v1/jobs", params={"label": bad})
        assert r.status_code == 400 and "query parameter label[0]" in r.json()["error"]["message"], bad
    job = client.post("/v1/jobs", json={"model": "org/model", "labels": {"team": ""}}).json()
    assert [j["id"] for j in client.get("/v1/jobs", params={"label": "team="}).json()["jobs"]] == [job["id"]]


def test_idempotency_key_is_constrained_in_schema_and_server(client, schema):
    key = parameter(schema, "/v1/jobs", "post", "Idempotency-Key")["schema"]["anyOf"][0]
    assert key["minLength"] == 1 and key["maxLength"] == 256 and key["pattern"] == "^[!-~](?:[ -~]{0,254}[!-~])?$"
    spec = {"model": "org/model"}
    assert client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "run 42/a~b"}).status_code == 202
    assert client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k" * 256}).status_code == 202
    for bad in ("k" * 257, b"caf\xe9"):  # too long; a non-ASCII (latin-1) byte
        r = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": bad})
        assert r.status_code == 400 and "header Idempotency-Key" in r.json()["error"]["message"], bad


def test_state_is_an_enum_and_a_large_limit_is_served_as_the_largest_page(client, schema):
    assert parameter(schema, "/v1/jobs", "get", "state")["schema"]["anyOf"][0]["enum"] == [
        "queued", "running", "succeeded", "failed", "cancelled"]
    assert parameter(schema, "/v1/jobs", "get", "limit")["schema"]["minimum"] == 1
    for _ in range(4):
        client.post("/v1/jobs", json={"model": "org/model"})
    page = client.get("/v1/jobs", params={"limit": 1000, "state": "queued"}).json()
    assert len(page["jobs"]) == 3 and page["next_cursor"]  # page_size_max=3
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 400


def test_a_405_allows_exactly_the_documented_methods_of_the_path(client, schema):
    concrete = {"{job_id}": "0c0ffee0-0000-4000-8000-000000000000", "{name}": "checkpoint", "{path}": "config.json"}
    for template, operations in schema["paths"].items():
        url = template
        for name, value in concrete.items():
            url = url.replace(name, value)
        documented = sorted(m.upper() for m in operations)
        for method in ("OPTIONS", "DELETE", "PUT", "PATCH", *(m for m in ("GET", "POST") if m not in documented)):
            r = client.request(method, url)
            assert r.status_code == 405, (method, url, r.status_code)
            assert sorted(m.strip() for m in r.headers["allow"].split(",")) == documented, (method, url, r.headers)
            assert r.json()["error"]["code"] == "method_not_allowed"


def test_a_405_from_a_mount_keeps_its_own_allow_header(client):
    r = client.post("/static/docs/swagger-ui.css")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert client.get("/v1/jobs/x:cancel").headers["allow"] == "POST"

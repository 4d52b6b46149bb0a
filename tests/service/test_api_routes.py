"""The REST routes as routers: each resource's APIRouter serves on an app of its own, create_app lists every
route flat (walkable, one match per request), and the status poll keeps its DirectRoute fast path."""

from __future__ import annotations

import fastapi.routing
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.auth import KeyRing
from service.api.dependencies import tenant_dep
from service.api.errors import install_error_handlers
from service.api.middleware import Metrics
from service.api.routes import artifacts, jobs, ops
from service.api.routing import DirectRoute, include_flat
from service.api.wiring import build_runtime
from service.settings import Settings

ROUTES = {("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"), ("POST", "/v1/jobs/{job_id}:cancel"),
          ("GET", "/v1/jobs/{job_id}/events"), ("GET", "/v1/jobs/{job_id}/report"), ("GET", "/v1/jobs/{job_id}/artifacts"),
          ("GET", "/v1/jobs/{job_id}/artifacts/{name}.tar"), ("GET", "/v1/jobs/{job_id}/artifacts/{name}/files/{path}"),
          ("GET", "/v1/workers"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    settings = Settings(storage=tmp_path_factory.mktemp("routes"))
    rt = build_runtime(settings)
    yield rt
    rt.close()


def bare_app(runtime, *routers, keys: dict[str, str] | None = None) -> FastAPI:
    """The least an app must provide for a router: the state its dependencies read and the error envelope."""
    app = FastAPI()
    app.state.runtime, app.state.settings = runtime, runtime.settings
    app.state.keys, app.state.metrics = KeyRing(keys or {}), Metrics()
    install_error_handlers(app)
    for router in routers:
        include_flat(app, router)
    return app


def test_create_app_lists_every_route_flat_with_the_poll_as_a_direct_route(runtime):
    app = create_app(runtime.settings, runtime=runtime)
    listed = {(m, r.path_format) for r in app.routes if isinstance(r, fastapi.routing.APIRoute) and r.include_in_schema
              for m in r.methods}
    assert listed == ROUTES
    poll = next(r for r in app.routes if getattr(r, "path_format", "") == "/v1/jobs/{job_id}")
    assert type(poll) is DirectRoute
    assert {(m, r.path_format) for mod in (jobs, artifacts, ops) for r in mod.router.routes for m in r.methods} == ROUTES


def test_the_poll_skips_fastapis_dependency_resolution(runtime, monkeypatch):
    calls = []
    real = fastapi.routing.solve_dependencies

    async def counting(*args, **kwargs):
        calls.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    with TestClient(create_app(runtime.settings, runtime=runtime)) as client:
        job = client.post("/v1/jobs", json={"model": "org/model"}).json()
        assert len(calls) == 1  # the submit route resolves its dependencies as usual
        for _ in range(3):
            r = client.get(f"/v1/jobs/{job['id']}")
            assert r.status_code == 200 and r.json()["id"] == job["id"]
        assert len(calls) == 1


def test_jobs_router_serves_on_an_app_of_its_own_with_an_overridden_tenant(runtime):
    app = bare_app(runtime, jobs.router, keys={"0" * 64: "someone"})
    with TestClient(app) as client:
        assert client.post("/v1/jobs", json={"model": "org/model"}).status_code == 401  # keyed, no key
        app.dependency_overrides[tenant_dep] = lambda: "tenant-x"
        made = client.post("/v1/jobs", json={"model": "org/model", "labels": {"k": "v"}})
        assert made.status_code == 202
        listed = client.get("/v1/jobs", params={"label": "k=v"}).json()["jobs"]
        assert [j["id"] for j in listed] == [made.json()["id"]]
        assert runtime.service.get("tenant-x", made.json()["id"]).spec.labels == {"k": "v"}
        assert client.get("/healthz").status_code == 404  # only the jobs router is there


def test_ops_router_serves_on_an_app_of_its_own(runtime):
    with TestClient(bare_app(runtime, ops.router)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json()["status"] == "ready"
        assert client.get("/v1/workers").json() == {"workers": [], "embedded_worker": None}  # not under kiln serve
        assert "kiln_workers 0" in client.get("/metrics").text

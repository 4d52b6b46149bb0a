"""A small seeded schemathesis run over /openapi.json (in process, real app, real SQLite): no 5xx, and every
response conforms to the schema (status documented, content type, body and headers), undocumented methods are
405 with the documented Allow, invalid data is refused and valid data accepted.

Deterministic (fixed seed, no example database), a few examples per operation. Left out: the SSE route (a
queued job's stream lasts until a worker finishes it); valid-data acceptance on POST /v1/jobs, because the
JobSpec's validators (repo id, webhook URL, sections that must go together) are more than JSON Schema can
say and answer 400 or 422 by design; and generated `cursor` values, which are opaque tokens only the server
issues (a made-up one is a 400).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (a dev dependency) is not installed")

from schemathesis.config import SchemathesisConfig  # noqa: E402  (after the importorskip)
from schemathesis.engine import Status, events  # noqa: E402

from service.api.app import create_app  # noqa: E402
from service.api.wiring import build_runtime  # noqa: E402
from service.settings import Settings  # noqa: E402

CONFIG = {
    "seed": 20261203,
    "generation": {"max-examples": 4, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "401", "404", "409", "422"]}},
    "operations": [
        {"include-path-regex": "/events$", "enabled": False},
        {"include-path": "/v1/jobs", "include-method": "POST", "checks": {"positive_data_acceptance": {"enabled": False}}},
    ],
}


def test_api_conforms_to_its_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a generated model id is looked up in the (empty) cache only: 422
    app_settings = Settings(storage=tmp_path)
    runtime = build_runtime(app_settings)
    try:
        app = create_app(app_settings, runtime=runtime)
        app.state.runtime = runtime  # what the lifespan sets; schemathesis calls the ASGI app without running it
        config = dict(CONFIG, parameters={"cursor": _real_cursor(runtime)})
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(config))
        failures, errors, cases, statuses = [], [], 0, {}
        for event in schemathesis.engine.from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                cases += len(event.recorder.cases)
                for interaction in event.recorder.interactions.values():
                    if interaction.response is not None:
                        code = interaction.response.status_code
                        statuses[code] = statuses.get(code, 0) + 1
                for checks in event.recorder.checks.values():
                    failures += [f"{event.recorder.label}: {c.name}: {c.failure_info.failure.title} "
                                 f"{c.failure_info.failure.message[:300]}"
                                 for c in checks if c.status == Status.FAILURE and c.failure_info]
            elif isinstance(event, (events.NonFatalError, events.FatalError)):
                errors.append(repr(getattr(event, "value", None) or getattr(event, "exception", None)))
    finally:
        runtime.close()
    assert not errors, errors
    assert not failures, "\n".join(sorted(set(failures)))
    assert cases >= 100 and not any(code >= 500 for code in statuses), (cases, statuses)
    assert {200, 400, 404, 405, 422} <= set(statuses), statuses  # it reached the code, not only the edges


def _real_cursor(runtime) -> str:
    """A cursor the server issued (a generated one is a made-up opaque token: 400 by design)."""
    from service.domain import JobSpec

    for _ in range(2):
        runtime.service.store.create(tenant="default", spec=JobSpec(model="org/model"), idempotency_key=None, queue="cpu")
    return runtime.service.list("default", limit=1)[1]

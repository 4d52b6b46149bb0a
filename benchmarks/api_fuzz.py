"""schemathesis against a live Kiln server: every operation of /openapi.json, >= 1,000 generated examples each
(the seeded in-process run in `make test` is tests/service/test_api_fuzz.py, a few examples each).

    PYTHONPATH=. .venv/bin/python benchmarks/api_fuzz.py --examples 1000            # starts `kiln serve --no-worker`
    PYTHONPATH=. .venv/bin/python benchmarks/api_fuzz.py --url http://127.0.0.1:8080 --key KEY --examples 1000

Without ``--url`` it starts ``kiln serve --no-worker`` (uvicorn, SQLite, HF_HUB_OFFLINE=1, an empty model
cache: a generated model id is a 422) on free ports over a temporary storage, with two queued jobs so that a
real cursor exists. Checks: every schemathesis check (no 5xx, status codes / content types / bodies / headers as
documented, invalid data refused, valid data accepted but for POST /v1/jobs, whose JobSpec validators say more
than JSON Schema can), plus no response slower than 2 s. Prints one table: operations, cases, responses by
status class, 5xx, schema violations, max and p99 latency. Exit 1 on any failure. The SSE route is left out (a
queued job's stream lasts until a worker finishes it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

SLOW_S = 2.0


def config(examples: int, seed: int, cursor: str | None) -> dict:
    return {
        "seed": seed,
        "generation": {"max-examples": examples, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "401", "404", "409", "422"]}},
        "operations": [
            {"include-path-regex": "/events$", "enabled": False},
            {"include-path": "/v1/jobs", "include-method": "POST",
             "checks": {"positive_data_acceptance": {"enabled": False}}},
        ],
        **({"parameters": {"cursor": cursor}} if cursor else {}),
    }


def run(url: str, examples: int, seed: int, key: str | None, cursor: str | None) -> dict:
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import Status, events

    cfg = config(examples, seed, cursor)
    if key:
        cfg["headers"] = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=SchemathesisConfig.from_dict(cfg))
    out: dict = {"operations": 0, "cases": 0, "statuses": Counter(), "violations": [], "errors": [], "latencies": []}
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            out["operations"] += 1
            out["cases"] += len(event.recorder.cases)
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    out["statuses"][interaction.response.status_code] += 1
                    out["latencies"].append(interaction.response.elapsed)
            for checks in event.recorder.checks.values():
                out["violations"] += [f"{event.recorder.label}: {c.name}: {c.failure_info.failure.title}"
                                      for c in checks if c.status == Status.FAILURE and c.failure_info]
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            out["errors"].append(repr(getattr(event, "value", None) or getattr(event, "exception", None))[:300])
    return out


def table(r: dict, seconds: float) -> str:
    lat = sorted(r["latencies"])
    classes = Counter(f"{code // 100}xx" for code in r["statuses"].elements())
    rows = [("operations", r["operations"]), ("cases", r["cases"]), ("responses", len(lat)),
            *((f"responses {k}", v) for k, v in sorted(classes.items())),
            ("5xx", sum(v for k, v in r["statuses"].items() if k >= 500)),
            ("schema violations (distinct)", len(set(r["violations"]))),
            (f"responses slower than {SLOW_S:g} s", sum(1 for x in lat if x > SLOW_S)),
            ("p99 latency", f"{lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000:.1f} ms" if lat else "-"),
            ("max latency", f"{lat[-1] * 1000:.1f} ms" if lat else "-"), ("errors", len(r["errors"])),
            ("wall time", f"{seconds:.0f} s")]
    return "| figure | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _local_server(root: Path):
    """`kiln serve --no-worker` over ``root`` (two queued jobs for a real cursor); (url, process, cursor)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from service.domain import JobSpec
    from tests.service.harness import free_port, service_env, settings_from, start_server, wait_http

    env = service_env(root / "storage")
    store_settings = settings_from(env)
    from service.store import JobStore, make_engine, migrate

    store = JobStore(make_engine(store_settings.db_url))
    migrate(store.engine)
    for _ in range(2):
        store.create(tenant="default", spec=JobSpec(model="org/model"), idempotency_key=None, queue="cpu")
    cursor = store.list(tenant="default", limit=1)[1]
    store.close()
    port = free_port()
    proc = start_server(env, root / "serve.log", port, -1, worker=False)
    wait_http(f"http://127.0.0.1:{port}/healthz", 90)
    return f"http://127.0.0.1:{port}", proc, cursor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=1000, help="generated examples per operation (default 1000)")
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--url", help="a running server (default: start kiln serve --no-worker here)")
    ap.add_argument("--key", help="API key for --url")
    ap.add_argument("--cursor", help="a next_cursor the server issued (generated ones are made-up tokens: 400)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            url, cursor = args.url, args.cursor
            if url is None:
                url, proc, cursor = _local_server(Path(tmp))
            result = run(url, args.examples, args.seed, args.key, cursor)
        finally:
            if proc is not None:
                from tests.service.harness import stop

                stop(proc)
    print(table(result, time.perf_counter() - start))
    for line in sorted(set(result["violations"]))[:20] + result["errors"][:5]:
        print("FAIL", line, file=sys.stderr)
    slow = sum(1 for x in result["latencies"] if x > SLOW_S)
    fivexx = sum(v for k, v in result["statuses"].items() if k >= 500)
    return 1 if (result["violations"] or result["errors"] or slow or fivexx) else 0


if __name__ == "__main__":
    sys.exit(main())

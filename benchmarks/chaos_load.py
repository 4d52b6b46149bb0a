"""Scenario 8 of ``benchmarks/chaos.py``: load. ``submitters`` clients POST jobs back to back and ``pollers``
clients GET a job's status back to back, for ``seconds``, against `kiln serve --no-worker` (the API alone: on a
2-core machine a worker compiling the submitted jobs would measure the compiler, not the API) on the embedded
default (SQLite) or the scaled mode (private PostgreSQL + Redis). One httpx.AsyncClient per kind, one
keep-alive connection per client. Reports submissions/s, polls/s, p50/p99 of each, and errors (5xx, transport
errors, timeouts: the target is 0 5xx). The load generator shares the machine with the server, so the figures
are a floor, not the server's ceiling.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from pathlib import Path

import httpx


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _drive(url: str, repo: str, poll_ids: list[str], seconds: float, submitters: int, pollers: int) -> dict:
    limits = httpx.Limits(max_connections=submitters + pollers, max_keepalive_connections=submitters + pollers)
    lat: dict[str, list[float]] = {"submit": [], "poll": []}
    status: dict[str, dict[str, int]] = {"submit": {}, "poll": {}}
    errors: list[str] = []
    stop_at = time.monotonic() + seconds

    async def client(kind: str, http: httpx.AsyncClient, i: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            t = time.perf_counter()
            try:
                if kind == "submit":
                    r = await http.post("/v1/jobs", json={"model": repo, "dtype": "float16",
                                                          "labels": {"load": f"{i}-{n}"}},
                                        headers={"Idempotency-Key": uuid.uuid4().hex})
                else:
                    r = await http.get(f"/v1/jobs/{poll_ids[(i + n) % len(poll_ids)]}")
            except httpx.HTTPError as exc:
                status[kind][type(exc).__name__] = status[kind].get(type(exc).__name__, 0) + 1
                if len(errors) < 10:
                    errors.append(f"{kind}: {type(exc).__name__} {exc}")
                continue
            lat[kind].append(time.perf_counter() - t)
            key = str(r.status_code)
            status[kind][key] = status[kind].get(key, 0) + 1
            if r.status_code >= 500 and len(errors) < 10:
                errors.append(f"{kind}: {r.status_code} {r.text[:200]}")

    timeout = httpx.Timeout(60.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as sub, \
            httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as pol:
        t0 = time.monotonic()
        await asyncio.gather(*[client("submit", sub, i) for i in range(submitters)],
                             *[client("poll", pol, i) for i in range(pollers)])
        wall = time.monotonic() - t0
    return {"lat": lat, "status": status, "errors": errors, "wall": wall}


def run_load(mode: str = "embedded", *, seconds: float = 60.0, submitters: int = 200, pollers: int = 1000,
             work: Path | None = None, log=print):
    from benchmarks.chaos import Result, Server, _workdir, install_model, private_backing

    res = Result(f"8: load, {submitters} submitters + {pollers} pollers for {seconds:.0f} s", mode=mode)
    t0 = time.monotonic()
    with _workdir(work) as work, private_backing(mode, work) as (env, _pg, _rds):
        storage = work / "storage"
        repo = install_model("tiny", storage, work)
        with Server(storage, work / "serve.log", args=("--no-worker",), **env) as srv:
            poll_ids = [srv.submit({"model": repo, "dtype": "float32", "labels": {"poll": str(i)}}) for i in range(20)]
            out = asyncio.run(_drive(srv.url, repo, poll_ids, seconds, submitters, pollers))
            created = srv.get("/v1/jobs", params={"limit": 1}).status_code
        wall = out["wall"]
        sub, pol = out["lat"]["submit"], out["lat"]["poll"]
        fivexx = sum(n for kind in out["status"].values() for k, n in kind.items() if k.isdigit() and int(k) >= 500)
        transport = sum(n for kind in out["status"].values() for k, n in kind.items() if not k.isdigit())
        res.submitted = out["status"]["submit"].get("201", 0) + out["status"]["submit"].get("202", 0)
        res.finished_once = res.submitted  # no worker: nothing runs; the row count is checked below
        res.api_errors = fivexx
        res.stuck = 0
        res.load = {  # type: ignore[attr-defined]
            "submissions/s": round(len(sub) / wall, 1), "polls/s": round(len(pol) / wall, 1),
            "submit p50/p99 ms": f"{statistics.median(sub) * 1e3:.0f}/{_pct(sub, 0.99) * 1e3:.0f}" if sub else "-",
            "poll p50/p99 ms": f"{statistics.median(pol) * 1e3:.0f}/{_pct(pol, 0.99) * 1e3:.0f}" if pol else "-",
            "5xx": fivexx, "transport errors": transport}
        res.notes.append("load: " + ", ".join(f"{k} {v}" for k, v in res.load.items()))  # type: ignore[attr-defined]
        res.notes.append("answers: " + "; ".join(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(st.items()))
                                                for kind, st in out["status"].items()))
        res.notes += [f"error: {e}" for e in out["errors"]]
        log(f"load ({mode}): {res.notes[-1 - len(out['errors'])]}; list after: {created}")
    res.seconds = time.monotonic() - t0
    return res

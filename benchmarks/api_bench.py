"""Status-poll and submission throughput of the REST API, with p50/p99 latency.

The API runs as its own process (`kiln serve --no-worker`, so jobs stay queued and the numbers are
the API's own), with an API key configured and sent on every request (as in production); the load
generator is this process: N concurrent keep-alive HTTP/1.1 connections on loopback, written on raw
asyncio streams so the client costs little CPU. Run:

    PYTHONPATH=. .venv/bin/python benchmarks/api_bench.py                 # SQLite and PostgreSQL
    PYTHONPATH=. .venv/bin/python benchmarks/api_bench.py --db sqlite --pollers 200 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Conn:
    def __init__(self, reader, writer, headers: str = ""):
        self.reader, self.writer, self.headers = reader, writer, headers

    async def request(self, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n{self.headers}{headers}"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        # the whole head in one read, parsed in one pass: the client shares the 2 cores with the server
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
        if chunked:  # not used by these routes, kept for safety
            data = b""
            while (size := int((await self.reader.readline()).strip(), 16)) > 0:
                data += await self.reader.readexactly(size + 2)
            await self.reader.readline()
            return status, data
        return status, await self.reader.readexactly(length)


API_KEY = secrets.token_urlsafe(24)  # this run's key; the server holds only its sha256
AUTH = f"Authorization: Bearer {API_KEY}\r\n"


async def connect(port: int, headers: str = AUTH) -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return Conn(reader, writer, headers)


async def run_load(port: int, make_request, clients: int, seconds: float, interval: float = 0.0) -> dict:
    """``clients`` connections; each sends its next request ``interval`` s after the previous one was sent
    (0: back to back). Latency is measured from send to the end of the response."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client():
        nonlocal errors
        conn = await connect(port)
        next_at = time.perf_counter() + random.random() * interval
        while time.perf_counter() < stop_at:
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval
            method, path, body = make_request()
            t = time.perf_counter()
            status, _ = await conn.request(method, path, body)
            latencies.append(time.perf_counter() - t)
            if status >= 400:
                errors += 1
        conn.writer.close()

    # The load generator is the measuring instrument: its own garbage collections (whose cost grows
    # with what earlier phases left behind) must not stall the clients and show up as server latency.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
        gc.unfreeze()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 100 else [max(latencies)] * 99
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / elapsed,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def start_api(storage: Path, database_url: str | None, port: int) -> subprocess.Popen:
    env = dict(os.environ, KILN_STORAGE=str(storage), PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_OFFLINE", None)  # submissions name a repo that is not cached: accepted, never fetched (no worker)
    env.pop("KILN_API_KEYS_FILE", None)
    env["KILN_API_KEYS"] = f"bench:sha256:{hashlib.sha256(API_KEY.encode()).hexdigest()}"
    if database_url:
        env["KILN_DATABASE_URL"] = database_url
    cmd = [sys.executable, "-m", "service.cli", "serve", "--no-worker", "--port", str(port), "--grpc-port", "-1"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(storage / "api.log", "ab"),
                            start_new_session=True)


async def wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = await connect(port)
            status, _ = await conn.request("GET", "/readyz")
            conn.writer.close()
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("API did not become ready")


async def bench_one(db: str, args) -> list[dict]:
    storage = Path(tempfile.mkdtemp(prefix=f"kiln-bench-{db}-"))
    pg = None
    url = None
    if db == "postgresql":
        import psycopg

        name = f"kiln_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.pg_admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        pg = name
        url = args.pg_admin.rsplit("/", 1)[0] + "/" + name
    port = free_port()
    api = start_api(storage, url, port)
    rows = []
    try:
        await wait_ready(port)
        counter = iter(range(10**9))
        spec = {"model": "org/bench-model", "dtype": "bfloat16"}

        def submit():
            return "POST", "/v1/jobs", json.dumps({**spec, "labels": {"n": str(next(counter))}}).encode()

        result = await run_load(port, submit, args.submitters, args.seconds / 2)
        rows.append({"db": db, "op": f"submit ({args.submitters} clients)", **result})
        conn = await connect(port)
        _, body = await conn.request("GET", "/v1/jobs?limit=200")
        ids = [j["id"] for j in json.loads(body)["jobs"]]
        conn.writer.close()

        def poll():
            return "GET", f"/v1/jobs/{random.choice(ids)}", b""

        await run_load(port, poll, args.pollers, 1.0)  # warm-up
        result = await run_load(port, poll, args.pollers, args.seconds, args.interval)
        rows.append({"db": db, "op": f"poll {args.pollers}x every {args.interval * 1000:.0f}ms", **result})
        result = await run_load(port, poll, args.pollers, args.seconds)
        rows.append({"db": db, "op": f"poll {args.pollers}x back-to-back", **result})
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=30)
        if pg:
            import psycopg

            with psycopg.connect(args.pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg}" WITH (FORCE)')
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.15, help="seconds between one poller's requests")
    parser.add_argument("--submitters", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    try:  # the load generator shares the cores with the server: uvloop keeps its own cost down
        from uvloop import run
    except ImportError:
        from asyncio import run
    rows = []
    for db in (["sqlite", "postgresql"] if args.db == "both" else [args.db]):
        rows += run(bench_one(db, args))
    print(f"| {'database':<10} | {'operation':<28} | {'requests':>8} | {'errors':>6} | {'req/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} |")
    print(f"|{'-' * 12}|{'-' * 30}|{'-' * 10}|{'-' * 8}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for r in rows:
        print(f"| {r['db']:<10} | {r['op']:<28} | {r['requests']:>8} | {r['errors']:>6} | {r['rps']:>7.0f} | "
              f"{r['p50_ms']:>7.1f} | {r['p99_ms']:>7.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

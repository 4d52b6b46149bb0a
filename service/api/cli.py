"""`kiln` service commands: serve, worker, submit, status, watch, download, cancel, workers, compile.

Client commands talk to ``--server`` (``KILN_SERVER``, default http://127.0.0.1:8080) with ``--api-key``
(``KILN_API_KEY``). ``serve`` with no configuration is the embedded default: API + gRPC + one worker
process, SQLite and a file-backed broker under ./.kiln, listening on loopback.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8080"

SUBMIT_EXAMPLES = """\
examples:
  kiln submit HuggingFaceTB/SmolLM2-135M-Instruct --dtype bfloat16 --label team=search --watch
  kiln submit --spec job.json                      # a whole JobSpec: quantization, build, evaluation
  kiln submit --gguf smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --dtype float16   # a file under KILN_SOURCES_DIR
  KILN_API_KEY=... kiln submit HuggingFaceTB/SmolLM2-135M-Instruct --server http://kiln:8080
"""


def register(sub: argparse._SubParsersAction) -> None:
    from service.compiler.cli import HelpFormatter

    def parser(name: str, help: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=kw.pop("description", help[:1].upper() + help[1:] + "."),
                              formatter_class=HelpFormatter, **kw)

    p = parser("serve", "run the API (REST + gRPC + dashboard) and, by default, one worker process",
               description="Run the API (REST + gRPC + dashboard) and, by default, one worker process. With no "
               "configuration: SQLite and a file-backed broker under ./.kiln, listening on loopback; "
               "KILN_* variables configure the rest (README: Configuration).")
    p.add_argument("--host", default=None, help="address to listen on (default KILN_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="REST port (default KILN_PORT, 8080)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default KILN_GRPC_PORT, 50051); -1 disables gRPC")
    p.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere: kiln worker)")
    p.set_defaults(func=cmd_serve)

    p = parser("worker", "run a Celery worker for this machine's queues")
    p.add_argument("--queues", default=None, help="comma-separated; default KILN_WORKER_QUEUES plus build.<sm> per GPU")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="jobs run at once (default 1)")
    p.add_argument("--name", default=None, help="worker name (default kiln-<pid>@<host>)")
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("gc", help="reclaim orphaned temporary stage outputs (crashed writers') and report what was freed")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("--expired-grace", type=float, default=None, metavar="S",
                   help="a running job's lease expired more than S seconds ago counts as dead (default KILN_LEASE_TTL_S)")
    p.add_argument("--unowned-older-than", type=float, default=None, metavar="S",
                   help="temp entries without an owner in their name: only when unchanged for S seconds "
                        "(default max(2 x KILN_LEASE_TTL_S, 60))")
    p.add_argument("--json", action="store_true", help="print the report (count, bytes, removed, kept) as JSON")
    p.set_defaults(func=cmd_gc)

    def client(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        g = p.add_argument_group("server")
        g.add_argument("--server", default=os.environ.get("KILN_SERVER", DEFAULT_SERVER), metavar="URL",
                       help=f"the Kiln server's URL (default KILN_SERVER, else {DEFAULT_SERVER})")
        g.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"), metavar="KEY",
                       help="API key sent as 'Authorization: Bearer KEY' (default KILN_API_KEY; prefer the "
                       "variable: command lines are visible to other users)")
        return p

    p = client(parser("submit", "submit a job (a repo id or a JSON JobSpec file)", epilog=SUBMIT_EXAMPLES))
    p.add_argument("model", nargs="?", help="Hugging Face repo id (overrides the spec file's model)")
    p.add_argument("--spec", type=Path, metavar="FILE", help="JSON JobSpec file (the REST API's POST /v1/jobs body)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the checkpoint's weights (default: the spec's, else auto)")
    p.add_argument("--tp-size", type=int, default=None, metavar="N", help="tensor-parallel ranks (default 1)")
    p.add_argument("--pp-size", type=int, default=None, metavar="N", help="pipeline-parallel stages (default 1)")
    p.add_argument("--revision", default=None, help="repo revision (default: main)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", default=None, metavar="PATH",
                     help="a llama.cpp .gguf file on the server's shared storage, relative to its sources root "
                     "(KILN_SOURCES_DIR); MODEL is then an optional display name")
    src.add_argument("--meta", default=None, metavar="PATH",
                     help="a Meta consolidated folder (params.json + consolidated.NN.pth) relative to the server's "
                     "sources root")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label to filter jobs by (repeatable)")
    p.add_argument("--idempotency-key", default=None, metavar="KEY",
                   help="submitting again with the same key returns the same job (default: a fresh key per "
                        "invocation, so the CLI's own retries of a lost answer never create a second job)")
    p.add_argument("--watch", action="store_true", help="watch until the job finishes")
    p.set_defaults(func=cmd_submit)

    p = client(parser("status", "show a job, or list jobs"))
    p.add_argument("job_id", nargs="?", help="the job to show (default: list jobs)")
    p.add_argument("--state", default=None, help="list only jobs in this state (queued, running, succeeded, ...)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_status)

    p = client(parser("watch", "follow a job with a progress bar until it finishes"))
    p.add_argument("job_id", help="the job to follow")
    p.set_defaults(func=cmd_watch)

    p = client(parser("download", "download a job's artifacts, resuming and verifying sha256"))
    p.add_argument("job_id", help="the job whose artifacts to download")
    p.add_argument("out", type=Path, help="directory to write ARTIFACT/FILE under")
    p.add_argument("--artifact", default=None, metavar="NAME", help="only this artifact (e.g. checkpoint, engine)")
    p.set_defaults(func=cmd_download)

    p = client(parser("cancel", "cancel a job"))
    p.add_argument("job_id", help="the job to cancel")
    p.set_defaults(func=cmd_cancel)

    p = client(parser("workers", "list live workers (GPUs, backends, queues)"))
    p.set_defaults(func=cmd_workers)

    p = parser("compile", "run the whole pipeline in this process (no server, no broker)")
    p.add_argument("model", help="Hugging Face repo id")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the checkpoint's weights; auto (default) keeps the model's")
    p.add_argument("--tp-size", type=int, default=1, metavar="N", help="tensor-parallel ranks (default 1)")
    p.add_argument("--pp-size", type=int, default=1, metavar="N", help="pipeline-parallel stages (default 1)")
    p.add_argument("--revision", default=None, help="repo revision (default: main)")
    p.set_defaults(func=cmd_compile)


# -- server side ------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from service.settings import Settings, UnsafeConfiguration

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("grpc_port", args.grpc_port)) if v is not None}
    settings = Settings(**overrides)
    try:
        settings.check_listen()
    except UnsafeConfiguration as exc:
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    if not check_reliability_settings(settings, "kiln serve"):
        return 2
    settings.storage_root.mkdir(parents=True, exist_ok=True)
    supervisor = None
    if not args.no_worker:
        from .supervisor import WorkerSupervisor

        env = dict(os.environ, KILN_STORAGE=str(settings.storage_root))
        supervisor = WorkerSupervisor([sys.executable, "-m", "service.cli", "worker"], env,
                                      backoff_s=settings.worker_restart_backoff_s,
                                      backoff_max_s=settings.worker_restart_backoff_max_s,
                                      stable_s=settings.worker_stable_s)
        supervisor.start()

    def _terminate(signum, _frame):  # uvicorn re-raises SIGTERM after its graceful stop: exit through finally
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        import asyncio

        try:  # uvloop (the api extra): uvicorn only picks it itself when it creates the loop, here _serve does
            import uvloop

            use_uvloop = True
        except ImportError:
            use_uvloop = False
        if use_uvloop:
            uvloop.run(_serve(settings, supervisor))
        else:
            asyncio.run(_serve(settings, supervisor))
    except KeyboardInterrupt:
        pass
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def uvicorn_config(app, settings, **overrides):
    """The uvicorn configuration of ``kiln serve``: its HTTP protocol closes a connection whose request headers
    do not arrive within ``KILN_REQUEST_HEADER_TIMEOUT_S`` (slowloris; the body has its own deadline in ``BodySizeLimit``)."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from .middleware import header_timeout_protocol

    options = dict(host=settings.host, port=settings.port, log_level="warning", access_log=False,
                   timeout_graceful_shutdown=5,
                   http=header_timeout_protocol(AutoHTTPProtocol, settings.request_header_timeout_s))
    return uvicorn.Config(app, **(options | overrides))


async def _serve(settings, supervisor=None) -> None:
    import asyncio
    import gc

    import uvicorn

    from .app import create_app
    from .wiring import build_runtime

    runtime = await asyncio.to_thread(build_runtime, settings)
    if supervisor is not None:
        runtime.supervisor = supervisor
        supervisor.on_exit = lambda pid: forget_worker_process(runtime.service.store, pid)
    app = create_app(settings, runtime=runtime)
    # Startup leaves ~250k long-lived objects (the compiler imports torch); a full GC walking them
    # takes ~120 ms on a 2-core VM, a stall every request in flight would wait for. Freeze them.
    # Young collections every 10,000 allocations instead of 700: at polling rates the default
    # re-scanned the objects of the requests in flight ~100 times a second (measured: ~3x less GC time).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 10)
    server = uvicorn.Server(uvicorn_config(app, settings))
    grpc_server = None
    if settings.grpc_port >= 0:
        try:
            from .grpc_server import create_server
        except ImportError as exc:  # stubs not generated: `make proto`
            print(f"kiln serve: gRPC disabled ({exc})", file=sys.stderr)
        else:
            grpc_server, port = await create_server(runtime.service, settings, port=settings.grpc_port)
            await grpc_server.start()
            print(f"kiln: gRPC on {settings.host}:{port}", flush=True)
    print(f"kiln: REST on http://{settings.host}:{settings.port} (dashboard /dashboard/, storage {settings.storage_root})",
          flush=True)
    try:
        await server.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        runtime.close()


def worker_name(pid: int) -> str:
    """The Celery node name of a ``kiln worker`` process (``%h`` is the host name)."""
    return f"kiln-{pid}@%h"


def forget_worker_process(store, pid: int) -> int:
    """Remove the registrations of a dead ``kiln worker`` process (its heartbeat would keep it listed
    for ``KILN_WORKER_TTL_S``). Returns how many rows went."""
    prefix = worker_name(pid).split("@")[0] + "@"
    gone = 0
    for w in store.live_workers(float("inf")):
        if w["id"].startswith(prefix):
            store.remove_worker(w["id"])
            gone += 1
    return gone


def check_reliability_settings(settings, who: str) -> bool:
    """Print the worker-settings warnings; False (after printing why) when they cannot work."""
    from service.settings import InvalidConfiguration

    try:
        warnings = settings.check_reliability()
    except InvalidConfiguration as exc:
        print(f"{who}: invalid settings: {exc}", file=sys.stderr)
        return False
    for w in warnings:
        print(f"{who}: warning: {w}", file=sys.stderr)
    return True


def cmd_worker(args) -> int:
    from service.settings import get_settings

    if not check_reliability_settings(get_settings(), "kiln worker"):
        return 2
    from service.workers.app import app
    from service.workers.runtime import detect_capabilities, worker_queues

    settings = get_settings()
    queues = args.queues or ",".join(worker_queues(settings, detect_capabilities()))
    name = args.name or worker_name(os.getpid())
    argv = ["worker", "-Q", queues, "-c", str(args.concurrency), "-n", name, "--loglevel", args.loglevel,
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    app.worker_main(argv)
    return 0


def cmd_gc(args) -> int:
    """Temp outputs under ``stages/`` whose lease is gone: never a live lease's (see ``reclaim_temps``)."""
    from service.settings import Settings
    from service.store import ArtifactStore, JobStore, make_engine, migrate
    from service.workers.runtime import unowned_grace_s

    settings = Settings()
    engine = make_engine(settings.db_url)
    migrate(engine)
    store = JobStore(engine)
    try:
        grace = settings.lease_ttl_s if args.expired_grace is None else args.expired_grace
        unowned = unowned_grace_s(settings) if args.unowned_older_than is None else args.unowned_older_than
        freed = ArtifactStore(settings.storage_root).reclaim_temps(
            lambda: store.live_leases(expired_grace_s=grace), unowned_older_than_s=unowned, dry_run=args.dry_run)
    finally:
        store.close()
        engine.dispose()
    if args.json:
        print(json.dumps({"removed": freed.removed, "count": len(freed.removed), "bytes": freed.bytes,
                          "kept": freed.kept, "failed": freed.failed, "dry_run": args.dry_run}, indent=1))
    else:
        for path in freed.removed:
            print(("would remove " if args.dry_run else "removed ") + path)
        verb = "would free" if args.dry_run else "freed"
        print(f"kiln gc: {verb} {len(freed.removed)} orphaned temp dirs, {freed.bytes} bytes "
              f"({freed.bytes / 2**20:.1f} MiB); kept {freed.kept} (live leases or too recent)")
        for path in freed.failed:
            print(f"kiln gc: could not remove {path}", file=sys.stderr)
    return 1 if freed.failed else 0


def cmd_compile(args) -> int:
    """The pipeline in-process: same stages, same storage layout, a job row in the local store."""
    from service.domain import JobService, JobSpec
    from service.settings import get_settings
    from service.store import ArtifactStore, JobStore, make_engine, migrate
    from service.workers.pipeline import PipelineRunner, load_stage_plugins
    from service.workers.stages import make_submit_validator

    settings = get_settings()
    load_stage_plugins(settings)
    engine = make_engine(settings.db_url)
    migrate(engine)
    store, artifacts = JobStore(engine), ArtifactStore(settings.storage_root)
    svc = JobService(store, artifacts, enqueue=lambda *_: None, validate=make_submit_validator(settings))
    spec = JobSpec(model=args.model, revision=args.revision, dtype=args.dtype,
                   mapping={"tp_size": args.tp_size, "pp_size": args.pp_size})
    try:
        job, _ = svc.submit("default", spec)
    except Exception as exc:
        print(f"kiln compile: {getattr(exc, 'code', 'error')}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        hint = getattr(exc, "hint", "")
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 2
    bar = _Bar()
    runner = PipelineRunner(settings, store, artifacts, worker_id=f"compile:{os.getpid()}")
    import threading

    done = threading.Event()

    def follow():
        while not done.wait(0.3):
            bar.show(store.get(job.id))

    threading.Thread(target=follow, daemon=True).start()
    runner.run(job.id)
    done.set()
    final = store.get(job.id)
    assert final is not None, "the job row this command created"
    bar.show(final, final=True)
    return _print_result(final.model_dump(mode="json"), {a.name: artifacts.path(a.stage, a.key) for a in final.artifacts})


def _print_result(job: dict, paths: dict[str, Path]) -> int:
    if job["state"] != "succeeded":
        err = job.get("error") or {}
        print(f"job {job['id']} {job['state']}: {err.get('code')}: {err.get('message')}", file=sys.stderr)
        if err.get("hint"):
            print(f"hint: {err['hint']}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"artifact {name}: {path}")
    return 0


# -- client side ------------------------------------------------------------------------------

class _Bar:
    """A job's progress on stderr: state, bar, percent, elapsed and ETA (on this client's clock, from the
    progress seen since watching began), stage, and its message (rank label kept, long names cut at the head)."""

    def __init__(self):
        import shutil
        import time

        self.tty = sys.stderr.isatty()
        self.columns = shutil.get_terminal_size((120, 24)).columns if self.tty else 160
        self.last = ""  # what was last shown (state, progress, stage, message)
        self.clock = time.perf_counter
        self.start = self.clock()
        self.first: tuple[float, float] | None = None  # (time, progress) when progress was first seen

    def show(self, job, final: bool = False) -> None:
        from service.compiler.cli import _RANK_PREFIX, _fmt_seconds, tail

        j = job if isinstance(job, dict) else job.model_dump(mode="json")
        now, progress = self.clock(), float(j.get("progress") or 0)
        if self.first is None and j["state"] == "running":
            self.first = (now, progress)
        eta = ""
        if not final and self.first is not None and progress > self.first[1] and progress < 1.0:
            t0, p0 = self.first
            eta = f" ETA {_fmt_seconds((now - t0) * (1 - progress) / (progress - p0))}"
        width = 30
        filled = int(width * progress)
        head = (f"{j['state']:<9} [{'#' * filled}{'.' * (width - filled)}] {100 * progress:5.1f}% "
                f"{_fmt_seconds(now - self.start)}{eta} {j.get('stage') or ''} ")
        message = j.get("message") or ""
        m = _RANK_PREFIX.match(message)
        if m:
            head += f"rank {m.group(1)}/{m.group(2)} "
            message = m.group(3)
        line = head + tail(message, max(self.columns - len(head) - 1, 20))
        key = f"{j['state']} {100 * progress:.1f} {j.get('stage')} {j.get('message')}"  # not the clock
        if key != self.last or final:
            self.last = key
            if self.tty:
                print("\r" + line.ljust(self.columns - 1), end="\n" if final else "", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)


class Client:
    def __init__(self, server: str, api_key: str | None):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=httpx.Timeout(30.0, read=None))

    # a request that is safe to send again (GET, or a POST carrying an Idempotency-Key) is retried when the
    # connection broke after it was sent (a keep-alive connection the server closed as the request went
    # out, a server killed mid-request) or the answer says "not now" (429, 502, 503, 504; Retry-After is
    # honoured up to RETRY_AFTER_MAX_S). A refused connection is not retried: nothing is listening.
    RETRIES = 3
    RETRY_STATUS = frozenset({429, 502, 503, 504})
    RETRY_AFTER_MAX_S = 10.0

    def call(self, method: str, url: str, **kw):
        import httpx

        headers = kw.get("headers") or {}
        safe = method in ("GET", "HEAD") or any(k.lower() == "idempotency-key" for k in headers)
        for attempt in range(self.RETRIES + 1 if safe else 1):
            last = attempt == self.RETRIES or not safe
            delay = 0.25 * 2 ** attempt
            try:
                resp = self.http.request(method, url, **kw)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                if last:
                    raise
            else:
                if resp.status_code not in self.RETRY_STATUS or last:
                    break
                try:
                    delay = max(delay, min(float(resp.headers.get("retry-after", "")), self.RETRY_AFTER_MAX_S))
                except ValueError:
                    pass
            time.sleep(delay)
        if resp.status_code >= 400:
            raise error_from_response(resp)
        return resp


class ClientError(Exception):
    def __init__(self, status: int, error: dict):
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.status, self.error = status, error


# Client-side hints for responses that carry none (a proxy's page, an old server).
_STATUS_HINTS = {
    401: "pass --api-key or set KILN_API_KEY",
    403: "this API key may not do that; ask for a key with the right scope",
    404: "check the job id (`kiln status` lists jobs) and that --server / KILN_SERVER is a Kiln server",
    413: "the request body is over the server's KILN_MAX_BODY_BYTES",
    429: "the server is rate-limiting this key; retry later",
    502: "a proxy in front of the Kiln server could not reach it; is `kiln serve` running?",
    503: "the server is not ready (starting, or its database/broker is down); retry, or check `kiln serve`'s log",
}


# What to do about an error code, in CLI terms (printed after the server's own hint).
_CODE_HINTS = {
    "unauthenticated": "pass --api-key or set KILN_API_KEY",
    "job_not_found": "`kiln status` lists the jobs this API key can see",
    "artifact_not_found": "`kiln status JOB` shows whether the job succeeded; download without --artifact "
                          "fetches every artifact it has",
    "no_worker": "`kiln workers` lists the queues and backends live workers serve; start one with `kiln worker`",
    "job_finished": "`kiln status JOB` shows its final state",
}


def error_from_response(resp) -> ClientError:
    """The server's ``{"error": {code, message, hint}}``, or a description of a non-Kiln answer."""
    resp.read()
    try:
        err = resp.json()["error"]
        if not isinstance(err, dict):
            raise TypeError
    except Exception:  # not Kiln's error body: a proxy, another service on that port
        ctype = resp.headers.get("content-type", "").split(";")[0].strip()
        text = " ".join(resp.text.split())[:160] if ctype in ("text/plain", "application/json") else ""
        err = {"code": f"http_{resp.status_code}",
               "message": f"{resp.reason_phrase or 'error'}" + (f": {text}" if text else "")
               + f" (not a Kiln error response{': ' + ctype if ctype else ''})",
               "hint": _STATUS_HINTS.get(resp.status_code, "is --server / KILN_SERVER a Kiln server?")}
    else:
        code = err.get("code") or f"http_{resp.status_code}"
        err = {"code": code, "message": err.get("message") or "", "hint": err.get("hint") or "",
               "cli_hint": _CODE_HINTS.get(code, "" if err.get("hint") else _STATUS_HINTS.get(resp.status_code, ""))}
    return ClientError(resp.status_code, err)


def transport_error_message(command: str, server: str, exc: Exception) -> str:
    """One line for an httpx transport error (nothing answered), with what to do about it."""
    import httpx

    detail = str(exc) or type(exc).__name__
    fix = "start it with `kiln serve` or set KILN_SERVER / --server"
    if isinstance(exc, httpx.ConnectError):
        what = "cannot reach the Kiln server"
    elif isinstance(exc, httpx.TimeoutException):
        what = "the Kiln server did not answer in time"
        fix = "check that the server is up and reachable (`kiln serve`), or set KILN_SERVER / --server"
    elif isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        what = "bad server URL"
        fix = "pass an http:// or https:// URL with --server or KILN_SERVER"
    elif isinstance(exc, httpx.ProxyError):
        what = "the proxy refused the connection to the Kiln server"
        fix = "check HTTP(S)_PROXY / NO_PROXY, or set KILN_SERVER / --server"
    else:  # RemoteProtocolError, ReadError, WriteError, ...: something answered, but not as HTTP
        what = "the connection to the Kiln server failed"
        fix = "check that --server / KILN_SERVER points at `kiln serve` (http://HOST:PORT)"
    return f"kiln {command}: {what} at {server}: {detail} — {fix}"


def _client_command(fn):
    @functools.wraps(fn)
    def wrapper(args) -> int:
        import httpx

        try:
            return fn(args, Client(args.server, args.api_key))
        except ClientError as exc:
            where = f"HTTP {exc.status} " if exc.status else ""
            print(f"kiln {args.command}: {where}{exc}", file=sys.stderr)
            for hint in dict.fromkeys(h for h in (exc.error.get("hint"), exc.error.get("cli_hint")) if h):
                print(f"hint: {hint}", file=sys.stderr)
            return 2 if exc.status < 500 else 1
        except (httpx.TransportError, httpx.InvalidURL) as exc:  # nothing (or no HTTP) answered at --server
            print(transport_error_message(args.command, args.server, exc), file=sys.stderr)
            return 1
        except UsageError as exc:
            print(f"kiln {args.command}: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # local files: --spec, download's OUT
            print(f"kiln {args.command}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"kiln {args.command}: interrupted", file=sys.stderr)
            return 130
    return wrapper


class UsageError(Exception):
    """A bad argument found after parsing (a --spec file that is not JSON, a label without '=')."""


@_client_command
def cmd_submit(args, client: Client) -> int:
    spec: dict = {}
    if args.spec:
        try:
            spec = json.loads(args.spec.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read --spec {args.spec}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"--spec {args.spec} is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise UsageError(f"--spec {args.spec} must hold a JSON object (a JobSpec)")
    elif not (args.model or args.gguf or args.meta):
        raise UsageError("give a model (Hugging Face repo id), --gguf PATH, --meta PATH or --spec FILE")
    bad = [item for item in args.label if "=" not in item]
    if bad:
        raise UsageError(f"--label takes KEY=VALUE, got {bad[0]!r}")
    if args.model:
        spec["model"] = args.model
    if args.gguf or args.meta:
        spec["source"] = {"kind": "gguf", "path": args.gguf} if args.gguf else {"kind": "meta", "path": args.meta}
    if args.dtype:
        spec["dtype"] = args.dtype
    if args.revision:
        spec["revision"] = args.revision
    if args.tp_size or args.pp_size:
        spec["mapping"] = {"tp_size": args.tp_size or 1, "pp_size": args.pp_size or 1}
    if args.label:
        spec["labels"] = dict(item.split("=", 1) for item in args.label)
    # always a key: a submission whose answer was lost on the way is retried without creating a second job
    headers = {"Idempotency-Key": args.idempotency_key or f"kiln-cli-{uuid.uuid4().hex}"}
    created = client.call("POST", "/v1/jobs", json=spec, headers=headers).json()
    print(created["id"])
    if args.watch:
        return _watch(client, created["id"])
    return 0


@_client_command
def cmd_status(args, client: Client) -> int:
    if args.job_id:
        job = client.call("GET", f"/v1/jobs/{args.job_id}").json()
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            print(f"{job['id']}  {job['state']}  {job['stage'] or '-'}  {100 * job['progress']:.0f}%  {job['spec']['model']}")
            for s in job["stages"]:
                hit = " (cache hit)" if s["cache_hit"] else ""
                secs = f"{s['seconds']:.2f}s" if s["seconds"] is not None else ""
                print(f"  {s['name']:<10} {s['state']:<8} {secs}{hit}")
            if job["error"]:
                print(f"  error: {job['error']['code']}: {job['error']['message']}")
        return 0
    params = {"state": args.state} if args.state else {}
    jobs = client.call("GET", "/v1/jobs", params=params).json()["jobs"]
    if args.json:
        print(json.dumps(jobs, indent=2))
    for job in jobs:
        print(f"{job['id']}  {job['state']:<9}  {100 * job['progress']:3.0f}%  {job['spec']['model']}")
    return 0


def _watch(client: Client, job_id: str) -> int:
    bar, job = _Bar(), None
    with client.http.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        if resp.status_code >= 400:
            raise error_from_response(resp)
        event = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "job":
                job = json.loads(line[6:])
                bar.show(job)
    if job is None:
        print(f"kiln: the server's event stream for job {job_id} ended without a job event", file=sys.stderr)
        return 1
    bar.show(job, final=True)
    if job["state"] != "succeeded":
        err = job.get("error") or {}
        print(f"job {job_id} {job['state']}: {err.get('code', '')} {err.get('message', '')}", file=sys.stderr)
        return 1
    return 0


@_client_command
def cmd_watch(args, client: Client) -> int:
    return _watch(client, args.job_id)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_artifacts(client: Client, job_id: str, out: Path, only: str | None = None) -> list[Path]:
    """Download every file, resuming partial files with Range, and verify each sha256."""
    from service.store.artifacts import safe_relpath

    written = []
    artifacts = client.call("GET", f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]
    for art in artifacts:
        if only and art["name"] != only:
            continue
        for f in art["files"]:
            target = out / safe_relpath(art["name"]) / safe_relpath(f["path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            if target.exists() and target.stat().st_size == f["size"] and _sha256(target) == f["sha256"]:
                written.append(target)
                continue
            have = partial.stat().st_size if partial.exists() else 0
            if have > f["size"]:
                partial.unlink()
                have = 0
            headers = {"Range": f"bytes={have}-"} if 0 < have < f["size"] else {}
            if have < f["size"] or f["size"] == 0:
                with client.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{art['name']}/files/{f['path']}",
                                        headers=headers) as resp:
                    if resp.status_code >= 400:
                        raise error_from_response(resp)
                    mode = "ab" if resp.status_code == 206 else "wb"
                    with open(partial, mode) as fh:
                        for chunk in resp.iter_bytes(1 << 20):
                            fh.write(chunk)
            digest = _sha256(partial)
            if digest != f["sha256"]:
                partial.unlink()
                raise ClientError(0, {"code": "checksum_mismatch",
                                      "message": f"{f['path']}: sha256 {digest} != {f['sha256']}", "hint": "run download again"})
            os.replace(partial, target)
            written.append(target)
    return written


@_client_command
def cmd_download(args, client: Client) -> int:
    files = download_artifacts(client, args.job_id, args.out, args.artifact)
    print(f"{len(files)} files verified (sha256) under {args.out}")
    return 0


@_client_command
def cmd_cancel(args, client: Client) -> int:
    job = client.call("POST", f"/v1/jobs/{args.job_id}:cancel").json()
    print(f"{job['id']} {job['state']}{' (cancel requested)' if job['cancel_requested'] and job['state'] == 'running' else ''}")
    return 0


@_client_command
def cmd_workers(args, client: Client) -> int:
    workers = client.call("GET", "/v1/workers").json()["workers"]
    if not workers:
        print("no live workers")
    for w in workers:
        gpus = ", ".join(f"{g['name']} ({g['sm']})" for g in w["gpus"]) or "no GPU"
        print(f"{w['id']}  queues={','.join(w['queues'])}  backends={','.join(w['backends'])}  {gpus}")
    return 0



"""Chaos runs against a real `kiln serve` and its supervised worker: on the embedded default (SQLite + file
broker) and, with ``--mode scaled``, on PostgreSQL + Redis (issue 19; the README's table comes from here).

1 ``kill``: SIGKILL the worker at random points of every stage (fetch, convert, quantize, build, evaluate,
  publish), alternating the whole worker (Celery main + pool child, which `kiln serve` respawns) and the
  pool child alone; one job through every stage per run, stage outputs wiped between runs.
2 ``api-kill``: SIGKILL `kiln serve` itself mid-job and restart it; then again mid-download of a 16 MB
  checkpoint file, resumed with ``Range: bytes=<received>-``: the sha256 must match the manifest.
3 ``redis-restart`` (scaled): restart a private Redis (AOF on) with 99 jobs queued behind one running.
4 ``pg-restart`` (scaled): stop a private PostgreSQL for 5 s mid-job while a client polls, lists, submits
  and probes /readyz: only 2xx/4xx or 503 + Retry-After, recovery by itself, the job finished once.
5 ``disk-full``: the storage root is a small tmpfs (root only), filled: ``storage_full``, nothing
  half-published, the space back, the same job fine once freed.
6 ``poison``: a job whose stage always crashes the worker stops after ``KILN_ATTEMPT_CAP`` attempts with a
  clear error, while the jobs submitted with it succeed.
7 ``race``: a second `kiln worker`; two identical jobs compute the same content-addressed keys at once.
8 ``load`` (``chaos_load.py``): 200 submitters + 1,000 pollers for 60 s: rates, p50/p99, 5xx.
``redelivery`` (scaled): SIGKILL the worker holding a Redis message, time until kombu puts it back
  (bounded by visibility timeout + ``KILN_BROKER_RESTORE_INTERVAL_S``; see ``service/workers/broker.py``).

Each reports: jobs submitted, finished exactly once (terminal, and no write to the row after that),
artifacts whose files all match their manifest sha256, duplicate stage outputs (committed key directories
no job stage refers to), partial directories visible (a key directory without a manifest), temporary
directories left behind, jobs stuck (not terminal within the timeout), API errors the client retried, and
recovery time (per scenario: kill -> the job claimed again, API back, first 200, message back...). The
scenarios that restart Redis or PostgreSQL use private servers (``chaos_backends.py``), never the shared
ones on :6379 / :5432. Run:

    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --scenario kill,poison --runs 6 --mode both --seed 19
    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --mode both --repeat 3 \\
        --scenario api-kill,disk-full,race,load,redis-restart,pg-restart,redelivery
    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --scenario kill --model smollm2   # the real SmolLM2-135M

``KILN_CHAOS_KEEP=1`` keeps each run's folder (serve.log, storage). The tiny models are random 2-layer
Llamas made here (never downloaded; "wide" has a 32k vocabulary for a 16 MB checkpoint file); SmolLM2
comes from the local cache (``service.compiler.sources.smollm2``). ``tests/service/test_chaos.py`` calls
``run_kill``, ``run_poison``, ``run_disk_full`` and ``run_api_kill`` for its short variants.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TINY_REPO = "kiln-chaos/tiny-llama"
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
STAGES = ("fetch", "convert", "quantize", "build", "evaluate", "publish")
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WIDE_REPO = "kiln-chaos/tiny-llama-wide"  # a 32k vocabulary: a 16 MB checkpoint file to download or to overflow a disk


MEDIUM_REPO = "kiln-chaos/medium-llama"  # ~26 M parameters: every stage lasts long enough to be struck inside


def make_tiny_llama(out: Path, vocab: int = 128, hidden: int = 64, layers: int = 2) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                 max_position_embeddings=256)).save_pretrained(out, safe_serialization=True)
    return out


def install_model(model: str, storage: Path, work: Path) -> str:
    from service.compiler.sources.smollm2 import install_into_hf_cache

    if model == "smollm2":
        from service.compiler.sources.smollm2 import smollm2_hf_dir

        install_into_hf_cache(smollm2_hf_dir(), storage / "hf-cache", repo_id=SMOLLM2_REPO)
        return SMOLLM2_REPO
    if model == "medium":
        install_into_hf_cache(make_tiny_llama(work / "medium-llama", vocab=8192, hidden=512, layers=4),
                              storage / "hf-cache", repo_id=MEDIUM_REPO)
        return MEDIUM_REPO
    if model == "wide":
        install_into_hf_cache(make_tiny_llama(work / "tiny-llama-wide", vocab=32000), storage / "hf-cache",
                              repo_id=WIDE_REPO)
        return WIDE_REPO
    install_into_hf_cache(make_tiny_llama(work / "tiny-llama"), storage / "hf-cache", repo_id=TINY_REPO)
    return TINY_REPO


def job_spec(repo: str, run: int) -> dict:
    """Every stage: quantize (W8A16), build (torch, CPU), evaluate; small enough for a 2-core machine."""
    return {"model": repo, "dtype": "float32", "labels": {"chaos-run": str(run)},
            "quantization": {"algo": "W8A16", "calibration": {"samples": 4, "seq_len": 32}},
            "build": {"backend": "torch", "target": "cpu", "max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64},
            "evaluation": {"max_samples": 2, "seq_len": 32, "max_new_tokens": 4}}


class Server:
    """`kiln serve` on a fresh storage root, with short leases so that a crash is noticed within seconds."""

    def __init__(self, storage: Path, log: Path, *, args: tuple[str, ...] = (), **env_extra):
        self.storage, self.log, self.args = storage, log, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        self.env.update({
            "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "KILN_STORAGE": str(storage),
            "KILN_LEASE_TTL_S": "4", "KILN_HEARTBEAT_S": "0.5", "KILN_RECONCILE_INTERVAL_S": "1",
            # a worker that lived 10 s was not crash-looping: the restart backoff starts over (the default,
            # 60 s, would count scenario 1's kills, one every ~30 s, as a crash loop and wait up to 60 s)
            "KILN_WORKER_HEARTBEAT_S": "1", "KILN_WORKER_RESTART_BACKOFF_S": "0.5", "KILN_WORKER_STABLE_S": "10",
            "KILN_STAGE_PLUGINS": "benchmarks.chaos_stages",
            "KILN_TASK_TIME_LIMIT_S": "600", "KILN_VISIBILITY_TIMEOUT_S": "900",
        })
        self.env.update({k: str(v) for k, v in env_extra.items()})
        self.proc: subprocess.Popen | None = None
        self.started_s = 0.0  # how long the last start took
        self._http = httpx.Client(base_url=self.url, timeout=10)
        self.http = self  # get/post below: retried, each failure recorded
        self.api_errors: list[str] = []

    def request(self, method: str, url: str, **kw) -> httpx.Response:
        """One API call; a transport error or a 5xx is recorded (reported as API errors) and retried."""
        for attempt in range(5):
            try:
                r = self._http.request(method, url, **kw)
            except httpx.HTTPError as exc:
                self.api_errors.append(f"{time.strftime('%H:%M:%S')} {method} {url}: {type(exc).__name__} {exc}")
            else:
                if r.status_code < 500:
                    return r
                self.api_errors.append(f"{time.strftime('%H:%M:%S')} {method} {url}: HTTP {r.status_code} {r.text[:200]}")
            time.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"{method} {url} failed 5 times: {self.api_errors[-1]}")

    def get(self, url: str, **kw) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw) -> httpx.Response:
        return self.request("POST", url, **kw)

    def start(self, timeout: float = 180, *, need_worker: bool = True) -> Server:
        """Start `kiln serve` (on the same port and storage after a kill); back when a worker registered
        (with ``--no-worker`` or ``need_worker=False``: when the API answers)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(self.port),
                                          "--grpc-port", "-1", *self.args], cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            self.started_s = time.monotonic() - t0
            try:
                if "--no-worker" in self.args or not need_worker:
                    if self._http.get("/readyz").status_code == 200:
                        return self
                elif self._http.get("/v1/workers").json()["workers"]:
                    return self
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"kiln serve did not come up: {self.log.read_text()[-2000:]}")

    def kill_api(self) -> None:
        """SIGKILL the `kiln serve` process alone (its worker gets SIGTERM from the kernel: PR_SET_PDEATHSIG)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __exit__(self, *_exc) -> None:
        self.stop()
        self._http.close()

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def submit(self, spec: dict) -> str:
        r = self.http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": uuid.uuid4().hex})  # safe to retry
        r.raise_for_status()
        return r.json()["id"]

    def embedded(self) -> dict:
        return self.http.get("/v1/workers").json()["embedded_worker"]

    def wait_worker(self, timeout: float = 120) -> int:
        """The pid of a running embedded worker that has registered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.http.get("/v1/workers").json()
            e = body["embedded_worker"]
            if e["state"] == "running" and any(w["id"].startswith(f"kiln-{e['pid']}@") for w in body["workers"]):
                return e["pid"]
            time.sleep(0.2)
        raise TimeoutError("no embedded worker registered")

    def wait_terminal(self, job_id: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["state"] in TERMINAL:
                return job
            time.sleep(0.2)
        return None


PG_ADMIN_URL = os.environ.get("KILN_CHAOS_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("KILN_CHAOS_REDIS_URL", "redis://127.0.0.1:6379/13")


@contextlib.contextmanager
def backing(mode: str):
    """Environment for the mode: embedded (SQLite + file broker under the storage root), or scaled (a
    throwaway PostgreSQL database + a flushed Redis database, dropped afterwards)."""
    if mode == "embedded":
        yield {}
        return
    import psycopg
    import redis

    name = f"kiln_chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    try:
        yield {"KILN_DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name, "KILN_BROKER_URL": REDIS_URL}
    finally:
        r.flushdb()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pool_children(pid: int) -> list[int]:
    """The children of every thread of ``pid``: billiard forks a replacement pool child from its supervisor
    thread, so the main thread's ``children`` file alone misses it."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(set(kids))


def sha_ok(storage: Path, artifact: dict) -> bool:
    base = storage / "stages" / artifact["stage"] / artifact["key"]
    for f in artifact["files"]:
        h = hashlib.sha256()
        try:
            with open(base / f["path"], "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        except OSError:
            return False
        if h.hexdigest() != f["sha256"]:
            return False
    return True


def audit_storage(storage: Path, expected: set[tuple[str, str]]) -> dict:
    """Committed key dirs nobody refers to (duplicates), key dirs without a manifest (partial, visible),
    and temp entries left behind."""
    found: dict[str, list[str]] = {"duplicates": [], "partial_visible": [], "temp_left": []}
    for stage_dir in sorted((storage / "stages").glob("*")):
        for entry in stage_dir.iterdir():
            name = f"{stage_dir.name}/{entry.name}"
            if entry.name.startswith("."):
                found["temp_left"].append(name)
            elif not (entry / "manifest.json").is_file():
                found["partial_visible"].append(name)
            elif (stage_dir.name, entry.name) not in expected:
                found["duplicates"].append(name)
    return found


@dataclass
class Result:
    scenario: str
    mode: str = "embedded"
    submitted: int = 0
    api_errors: int = 0
    finished_once: int = 0
    succeeded: int = 0
    artifacts_ok: int = 0
    artifacts: int = 0
    duplicates: int = 0
    partial_visible: int = 0
    temp_left: int = 0
    stuck: int = 0
    recovery_s: list[float] = field(default_factory=list)
    kills: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def row(self) -> dict:
        rec = self.recovery_s
        return {"scenario": self.scenario, "mode": self.mode, "submitted": self.submitted,
                "finished exactly once": self.finished_once, "succeeded": self.succeeded,
                "artifacts sha256 ok": f"{self.artifacts_ok}/{self.artifacts}", "duplicates": self.duplicates,
                "partial dirs visible": self.partial_visible, "temp dirs left": self.temp_left, "stuck": self.stuck,
                "API errors (retried)": self.api_errors,
                "recovery s (median/max)": f"{statistics.median(rec):.1f}/{max(rec):.1f}" if rec else "-",
                "kills by stage": ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items())) or "-",
                "wall s": f"{self.seconds:.0f}"}


def _settle_and_audit(srv: Server, res: Result, job: dict, settle_s: float) -> None:
    """A terminal job: no write after it (exactly once), artifacts checked file by file."""
    time.sleep(settle_s)  # longer than a reconcile interval: a second run would have written by now
    again = srv.job(job["id"])
    if again["state"] == job["state"] and again.get("finished_at") == job.get("finished_at") \
            and again["attempts"] == job["attempts"]:
        res.finished_once += 1
    else:
        res.notes.append(f"job {job['id'][:8]} changed after finishing: {job['state']} -> {again['state']}")
    if job["state"] == "succeeded":
        res.succeeded += 1
    for art in srv.http.get(f"/v1/jobs/{job['id']}/artifacts").json()["artifacts"]:
        res.artifacts += 1
        res.artifacts_ok += sha_ok(srv.storage, art)


def _api_errors(res: Result, srv: Server) -> None:
    res.api_errors = len(srv.api_errors)
    res.notes += [f"API error: {e}" for e in srv.api_errors[:10]]


def _count(res: Result, audit: dict[str, list[str]]) -> None:
    res.duplicates += len(audit["duplicates"])
    res.partial_visible += len(audit["partial_visible"])
    res.temp_left += len(audit["temp_left"])
    for what, names in audit.items():
        if names:
            res.notes.append(f"{what}: {', '.join(names)}")


def _wipe_stage_outputs(storage: Path) -> None:
    shutil.rmtree(storage / "stages", ignore_errors=True)


@contextlib.contextmanager
def _serving(srv: Server | None, storage: Path, log: Path, mode: str, **env_extra):
    """``srv`` when given (one `kiln serve` shared by the short tests), else a fresh one on ``storage``."""
    if srv is not None:
        yield srv
        return
    with backing(mode) as env, Server(storage, log, **env_extra, **env) as fresh:
        yield fresh


def run_kill(runs: int = 6, *, model: str = "tiny", seed: int = 0, timeout: float = 300.0, work: Path | None = None,
             mode: str = "embedded", srv: Server | None = None, light: bool = False, log=print) -> Result:
    """``light`` (the short test): jobs stop after quantize, kills aimed at fetch, convert or quantize."""
    rng = random.Random(seed)
    res = Result("1: SIGKILL worker at random points of every stage", mode=mode)
    took: dict[str, float] = {}  # each stage's duration in the last run that ran it: where to strike next time
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="kiln-chaos-")) if own else work
    storage = srv.storage if srv is not None else work / "storage"
    repo = install_model(model, storage, work)
    t0 = time.monotonic()
    restarts0 = srv.embedded()["restarts"] if srv is not None else 0
    try:
        with _serving(srv, storage, work / "serve.log", mode) as srv:
            for run in range(runs):
                target = STAGES[run % (3 if light else len(STAGES))]
                whole = run % 2 == 0  # alternate: the whole worker, the pool child only
                _wipe_stage_outputs(storage)
                pid = srv.wait_worker()
                spec = job_spec(repo, run)
                if light:
                    spec = {k: v for k, v in spec.items() if k not in ("build", "evaluation")}
                job_id = srv.submit(spec)
                res.submitted += 1
                # wait for the target stage (publish: the end of evaluate), then a random moment inside it
                watch = "evaluate" if target == "publish" else target
                deadline = time.monotonic() + timeout
                job = srv.job(job_id)
                while job["stage"] != watch and job["state"] not in TERMINAL and time.monotonic() < deadline:
                    time.sleep(0.005)
                    job = srv.job(job_id)
                # a random moment inside the stage, from the duration it took last time (less the ~30 ms it
                # takes to see it start); publish: the end of evaluate
                span = took.get(watch, 0.4)
                time.sleep(rng.uniform(0.7, 1.0) * span if target == "publish" else rng.uniform(0.0, 0.8) * span)
                job = srv.job(job_id)
                seen = job["stage"] or ("after finish" if job["state"] in TERMINAL else "queued")
                attempts = job["attempts"]
                victims = [pid] if whole else pool_children(pid)
                kill_at = time.monotonic()
                for victim in victims:
                    try:
                        (os.killpg if whole else os.kill)(victim, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                what = f"{seen} ({'worker' if whole else 'pool child'})"
                res.kills[what] = res.kills.get(what, 0) + 1
                # recovery: the job claimed again (a new attempt running) or finished
                rec = None
                while time.monotonic() < deadline:
                    job = srv.job(job_id)
                    if job["state"] in TERMINAL or (job["state"] == "running" and job["attempts"] > attempts):
                        rec = time.monotonic() - kill_at
                        break
                    time.sleep(0.1)
                if rec is not None and seen not in ("after finish",):
                    res.recovery_s.append(rec)
                final = srv.wait_terminal(job_id, max(1.0, deadline - time.monotonic()))
                if final is None:
                    res.stuck += 1
                    log(f"run {run}: job {job_id} stuck ({srv.job(job_id)['state']})")
                    continue
                for s in final["stages"]:
                    if s.get("seconds") and not s.get("cache_hit"):
                        took[s["name"]] = max(0.0, float(s["seconds"]) - 0.03)
                _settle_and_audit(srv, res, final, settle_s=2.5)
                expected = {(s["name"], s["key"]) for s in final["stages"] if s.get("key")}
                audit = audit_storage(storage, expected)
                _count(res, audit)
                log(f"run {run}: killed the {'worker' if whole else 'pool child'} during {seen}; "
                    f"{final['state']} after {final['attempts']} attempts; recovery {rec or 0:.1f}s; {audit}")
            e = srv.embedded()
            res.notes.append(f"embedded worker restarts: {e['restarts'] - restarts0}")
            _api_errors(res, srv)
    finally:
        res.seconds = time.monotonic() - t0
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return res


def run_poison(others: int = 3, *, model: str = "tiny", attempt_cap: int = 3, timeout: float = 300.0,
               work: Path | None = None, mode: str = "embedded", srv: Server | None = None, victim: str = "worker",
               log=print) -> Result:
    """``victim``: "worker" (the poison stage SIGKILLs the whole worker: `kiln serve` respawns it) or "child"
    (only the pool process: Celery forks a new one at once). With ``srv``, its KILN_ATTEMPT_CAP applies."""
    res = Result(f"6: poison job (KILN_ATTEMPT_CAP={attempt_cap}, kills the {victim}) + {others} good jobs", mode=mode)
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="kiln-chaos-")) if own else work
    storage = srv.storage if srv is not None else work / "storage"
    repo = install_model(model, storage, work)
    t0 = time.monotonic()
    restarts0 = srv.embedded()["restarts"] if srv is not None else 0
    try:
        with _serving(srv, storage, work / "serve.log", mode, KILN_ATTEMPT_CAP=attempt_cap) as srv:
            _wipe_stage_outputs(storage)
            srv.wait_worker()
            poison = srv.submit({"model": repo, "dtype": "float32", "labels": {"poison": victim}})
            dtypes = (["float16", "bfloat16", "float32"] * (others // 3 + 1))[:others]
            good = [srv.submit({"model": repo, "dtype": d, "labels": {"chaos-good": str(i)}}) for i, d in enumerate(dtypes)]
            res.submitted = 1 + len(good)
            finals = {}
            for job_id in [poison, *good]:
                final = srv.wait_terminal(job_id, timeout)
                if final is None:
                    res.stuck += 1
                    log(f"job {job_id} stuck ({srv.job(job_id)['state']})")
                else:
                    finals[job_id] = final
            for final in finals.values():
                _settle_and_audit(srv, res, final, settle_s=0.5)
            p = finals.get(poison)
            if p is not None:
                err = p.get("error") or {}
                ok = p["state"] == "failed" and p["attempts"] == attempt_cap + 1 and \
                    f"gave up after {attempt_cap} attempts" in (err.get("message") or "")
                res.notes.append(f"poison job: {p['state']} after {p['attempts'] - 1} attempts: "
                                 f"{err.get('code')}: {err.get('message')}" + ("" if ok else " (UNEXPECTED)"))
                res.kills[f"poison stage ({victim})"] = p["attempts"] - 1
            expected = {(s["name"], s["key"]) for f in finals.values() for s in f["stages"] if s.get("key")}
            time.sleep(2.0)  # one reconcile pass after the last death
            audit = audit_storage(storage, expected)
            _count(res, audit)
            res.notes.append(f"embedded worker restarts: {srv.embedded()['restarts'] - restarts0}")
            _api_errors(res, srv)
            log(f"poison: {p and p['state']}; good jobs succeeded: {sum(finals[g]['state'] == 'succeeded' for g in good if g in finals)}/{len(good)}")
    finally:
        res.seconds = time.monotonic() - t0
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return res


# -- scenarios 2-5, 7 and the Redis redelivery measurement ------------------------------------------------------

@contextlib.contextmanager
def _workdir(work: Path | None):
    own = work is None and not os.environ.get("KILN_CHAOS_KEEP")  # KILN_CHAOS_KEEP=1: keep logs and storage
    path = Path(tempfile.mkdtemp(prefix="kiln-chaos-")) if work is None else work
    try:
        yield path
    finally:
        if own:
            shutil.rmtree(path, ignore_errors=True)
        elif work is None:
            print(f"kept {path}")


@contextlib.contextmanager
def private_backing(mode: str, work: Path):
    """Like ``backing``, but scaled mode gets its own PostgreSQL and Redis (``chaos_backends``), which the
    restart scenarios may stop and start; the shared servers on :5432 / :6379 are never touched."""
    from benchmarks.chaos_backends import PrivatePostgres, PrivateRedis

    if mode == "embedded":
        yield {}, None, None
        return
    pg = redis_srv = None
    try:
        pg = PrivatePostgres(work).start()
        redis_srv = PrivateRedis(work).start()
        yield {"KILN_DATABASE_URL": pg.url, "KILN_BROKER_URL": redis_srv.url}, pg, redis_srv
    finally:
        for srv in (redis_srv, pg):
            if srv is not None:
                srv.close()


def _finish_jobs(srv: Server, res: Result, job_ids: list[str], timeout: float, settle_s: float = 2.0,
                 log=print) -> dict[str, dict]:
    """Wait for every job, then audit each (exactly once, sha256) and the storage (duplicates, partial, temp)."""
    finals: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    for job_id in job_ids:
        final = srv.wait_terminal(job_id, max(1.0, deadline - time.monotonic()))
        if final is None:
            res.stuck += 1
            log(f"job {job_id} stuck ({srv.job(job_id)['state']})")
        else:
            finals[job_id] = final
    time.sleep(settle_s)
    for final in finals.values():
        _settle_and_audit(srv, res, final, settle_s=0.0)
    expected = {(s["name"], s["key"]) for f in finals.values() for s in f["stages"] if s.get("key")}
    _count(res, audit_storage(srv.storage, expected))
    return finals


def _wait_stage(srv: Server, job_id: str, stages: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    job = srv.job(job_id)
    while job["stage"] not in stages and job["state"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.05)
        job = srv.job(job_id)
    return job


def _download(srv: Server, job_id: str, kill_after: int | None = None) -> tuple[dict, bytes, int]:
    """The largest file of the job's artifacts, streamed; with ``kill_after`` the API is SIGKILLed once that
    many bytes arrived (and restarted), then the download resumes with ``Range: bytes=<got>-``."""
    arts = srv.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]
    art, entry = max(((a, f) for a in arts for f in a["files"]), key=lambda af: af[1]["size"])
    url = f"/v1/jobs/{job_id}/artifacts/{art['name']}/files/{entry['path']}"
    got = bytearray()
    killed = False
    resumed_from = -1
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        try:
            with http.stream("GET", url) as r:
                r.raise_for_status()
                for chunk in r.iter_raw(64 << 10):
                    got += chunk
                    if kill_after is not None and not killed and len(got) >= kill_after:
                        srv.kill_api()
                        killed = True
        except httpx.HTTPError:
            pass  # the connection died with the API
        if killed:
            resumed_from = len(got)
            srv.start(need_worker=False)  # a download needs only the API
            r = srv.get(url, headers={"Range": f"bytes={len(got)}-"})
            if r.status_code != 206 or r.headers.get("Content-Range") != f"bytes {len(got)}-{entry['size'] - 1}/{entry['size']}":
                raise RuntimeError(f"resume answered {r.status_code} {r.headers.get('Content-Range')}")
            got += r.content
    return entry, bytes(got), resumed_from


def run_api_kill(runs: int = 3, *, timeout: float = 300.0, work: Path | None = None, mode: str = "embedded",
                 srv: Server | None = None, light: bool = False, log=print) -> Result:
    """Scenario 2: SIGKILL `kiln serve` (the API process) mid-job, restart it as a process manager would; then
    SIGKILL it mid-download of a 16 MB checkpoint file and resume with a Range request: sha256 must match.
    ``light`` (the short test): one kill, while a fetch + convert job's file downloads and a second job pauses
    mid-job (``chaos_stages``' pause stage); else each job runs every stage and is killed in turn."""
    res = Result("2: SIGKILL the API mid-job and mid-download (Range resume)", mode=mode)
    t0 = time.monotonic()
    with _workdir(work) as work, (contextlib.nullcontext(({}, None, None)) if srv is not None
                                  else private_backing(mode, work)) as (env, _pg, _redis):
        storage = srv.storage if srv is not None else work / "storage"
        repo = install_model("wide", storage, work)
        with (contextlib.nullcontext(srv) if srv is not None else Server(storage, work / "serve.log", **env)) as srv:
            resumed_ok = 0
            for run in range(runs):
                _wipe_stage_outputs(storage)
                spec = job_spec(repo, run)
                if light:  # fetch + convert (the 16 MB file to download)
                    spec = {"model": repo, "dtype": "float32", "labels": {"chaos-run": str(run)}}
                job_id = srv.submit(spec)
                res.submitted += 1
                if light:  # one kill for both: mid-download of a finished job's file while a second job runs
                    if srv.wait_terminal(job_id, timeout) is None:
                        res.stuck += 1
                        continue
                    running = srv.submit({**spec, "dtype": "float16", "labels": {"chaos-run": f"{run}-b", "chaos-pause": "8"}})
                    res.submitted += 1
                    seen = _wait_stage(srv, running, ("pause",), timeout)["stage"] or "finished"
                    entry, data, resumed_from = _download(srv, job_id, kill_after=entry_size_quarter(srv, job_id))
                    res.recovery_s.append(srv.started_s)  # kill -> API back
                    ok = 0 < resumed_from < entry["size"] and len(data) == entry["size"] and \
                        hashlib.sha256(data).hexdigest() == entry["sha256"]
                    resumed_ok += ok
                    res.kills[f"API mid-download, a job in {seen}"] = res.kills.get(f"API mid-download, a job in {seen}", 0) + 1
                    res.kills["API mid-download"] = res.kills.get("API mid-download", 0) + 1
                    finals = _finish_jobs(srv, res, [job_id, running], timeout, log=log)
                    log(f"run {run}: API killed mid-download (cut at byte {resumed_from} of {entry['size']}: sha256 "
                        f"{'ok' if ok else 'MISMATCH'}) while a job ran {seen}: {finals.get(running, {}).get('state')}")
                    continue
                target = (("quantize", "build", "evaluate")[run % 3],)
                seen = _wait_stage(srv, job_id, target, timeout)["stage"] or "finished"
                old_group = srv.proc.pid if srv.proc else None
                kill_at = time.monotonic()
                srv.kill_api()
                srv.start()
                res.recovery_s.append(time.monotonic() - kill_at)  # kill -> API and a worker back
                res.kills[f"API during {seen}"] = res.kills.get(f"API during {seen}", 0) + 1
                finals = _finish_jobs(srv, res, [job_id], timeout, log=log)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if old_group:
                        os.killpg(old_group, signal.SIGKILL)  # the old worker, had it outlived its job
                final = finals.get(job_id)
                if final is None or final["state"] != "succeeded":
                    continue
                entry, data, resumed_from = _download(srv, job_id, kill_after=entry_size_quarter(srv, job_id))
                ok = 0 < resumed_from < entry["size"] and len(data) == entry["size"] and \
                    hashlib.sha256(data).hexdigest() == entry["sha256"]
                resumed_ok += ok
                res.kills["API mid-download"] = res.kills.get("API mid-download", 0) + 1
                log(f"run {run}: API killed during {seen}; job {final['state']} after {final['attempts']} attempts; "
                    f"download of {entry['path']} ({entry['size']} B) cut at byte {resumed_from}, resumed with Range: "
                    f"sha256 {'ok' if ok else 'MISMATCH'}")
            res.notes.append(f"Range resumes after an API kill whose sha256 matched: {resumed_ok}/{res.kills.get('API mid-download', 0)}")
            if resumed_ok != res.kills.get("API mid-download", 0):
                res.artifacts_ok -= 1  # counted as a corrupt artifact: the run fails
            _api_errors(res, srv)
    res.seconds = time.monotonic() - t0
    return res


def entry_size_quarter(srv: Server, job_id: str) -> int:
    arts = srv.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]
    return max(f["size"] for a in arts for f in a["files"]) // 4


def _queued_message_count(client, queue: str = "cpu") -> int:
    return int(client.llen(queue))


def run_redis_restart(jobs: int = 100, *, timeout: float = 600.0, work: Path | None = None, down_s: float = 2.0,
                      log=print) -> Result:
    """Scenario 3 (scaled only): a private Redis (AOF on) restarted while ``jobs`` jobs are queued and one runs.
    0 lost (all terminal), 0 run twice (each finished once; attempts reported)."""
    res = Result(f"3: restart Redis (AOF) with {jobs} jobs queued/running", mode="scaled")
    t0 = time.monotonic()
    with _workdir(work) as work, private_backing("scaled", work) as (env, _pg, rds):
        storage = work / "storage"
        repo = install_model("tiny", storage, work)
        with Server(storage, work / "serve.log", KILN_REQUEUE_AFTER_S=30, **env) as srv:
            srv.wait_worker()
            # the first job runs every stage (~10-30 s here), so the others stay queued behind it (one worker slot)
            spec = {"model": repo, "dtype": "float32"}
            ids = [srv.submit(job_spec(repo, 0))]
            ids += [srv.submit({**spec, "labels": {"chaos-redis": str(i)}}) for i in range(1, jobs)]
            res.submitted = len(ids)
            _wait_stage(srv, ids[0], ("build", "evaluate"), timeout)
            states = srv.get("/v1/jobs", params={"limit": 200}).json()
            before = {s: sum(j["state"] == s for j in states["jobs"]) for s in ("queued", "running", "succeeded")}
            in_redis = _queued_message_count(rds.client())
            away = rds.restart(down_s)
            back_at = time.time()
            res.notes.append(f"at the restart: {before['queued']} queued, {before['running']} running, "
                             f"{before['succeeded']} done; {in_redis} messages in the Redis queue; Redis away {away:.1f} s")
            finals = _finish_jobs(srv, res, ids, timeout, log=log)
            after = [f["finished_at"] for f in finals.values() if (f.get("finished_at") or 0) > back_at]
            if after:  # Redis back -> the first job finished after it
                res.recovery_s.append(min(after) - back_at)
            retried = sum(f["attempts"] > 1 for f in finals.values())
            res.notes.append(f"jobs with more than one attempt (a running task cancelled when the broker "
                             f"connection dropped, then re-run): {retried}")
            c = rds.client()
            res.notes.append(f"after: {c.llen('cpu')} messages queued, {c.hlen('unacked')} unacked (a message left in "
                             "`unacked` comes back after the visibility timeout and finds its job finished: skipped)")
            _api_errors(res, srv)
    res.seconds = time.monotonic() - t0
    return res


def run_pg_restart(runs: int = 3, *, timeout: float = 300.0, work: Path | None = None, down_s: float = 5.0,
                   log=print) -> Result:
    """Scenario 4 (scaled only): a private PostgreSQL restarted (``pg_ctl stop -m fast``, away ``down_s``) while
    a job runs and a client polls, lists, submits and probes /readyz: every answer is 2xx/4xx or a 503 with
    Retry-After, never another 5xx; the API recovers by itself; the job finishes exactly once."""
    import threading

    res = Result("4: restart PostgreSQL mid-job", mode="scaled")
    t0 = time.monotonic()
    codes: dict[str, int] = {}
    bad: list[str] = []
    with _workdir(work) as work, private_backing("scaled", work) as (env, pg, _rds):
        storage = work / "storage"
        repo = install_model("tiny", storage, work)
        with Server(storage, work / "serve.log", **env) as srv:
            for run in range(runs):
                _wipe_stage_outputs(storage)
                srv.wait_worker()
                job_id = srv.submit(job_spec(repo, run))
                res.submitted += 1
                seen = _wait_stage(srv, job_id, ("quantize", "build"), timeout)["stage"] or "finished"
                stop = threading.Event()
                last_ok = [0.0]
                submitted: list[str] = []

                def probe(stop=stop, job_id=job_id, submitted=submitted, last_ok=last_ok) -> None:
                    i = 0
                    with httpx.Client(base_url=srv.url, timeout=10) as http:
                        while not stop.is_set():
                            i += 1
                            calls = [("GET", f"/v1/jobs/{job_id}", None), ("GET", "/v1/jobs", None), ("GET", "/readyz", None)]
                            if i % 5 == 0:
                                calls.append(("POST", "/v1/jobs", {"model": repo, "dtype": "float16", "labels": {"pg": str(i)}}))
                            for method, url, body in calls:
                                try:
                                    r = http.request(method, url, json=body,
                                                     headers={"Idempotency-Key": uuid.uuid4().hex} if body else None)
                                except httpx.HTTPError as exc:
                                    codes[type(exc).__name__] = codes.get(type(exc).__name__, 0) + 1
                                    continue
                                key = str(r.status_code) + ("+Retry-After" if r.headers.get("Retry-After") else "")
                                codes[key] = codes.get(key, 0) + 1
                                if r.status_code >= 500 and not (r.status_code == 503 and r.headers.get("Retry-After")):
                                    bad.append(f"{method} {url}: {r.status_code} {r.text[:200]}")
                                if r.status_code in (201, 202):
                                    submitted.append(r.json()["id"])
                                if method == "GET" and url.startswith("/v1/jobs/") and r.status_code == 200:
                                    last_ok[0] = time.monotonic()
                            time.sleep(0.05)

                thread = threading.Thread(target=probe, daemon=True)
                thread.start()
                time.sleep(0.5)
                pg.stop()
                time.sleep(down_s)
                pg.start()
                up_at = time.monotonic()
                while last_ok[0] < up_at and time.monotonic() - up_at < 60:
                    time.sleep(0.05)
                res.recovery_s.append(last_ok[0] - up_at if last_ok[0] >= up_at else float("inf"))
                time.sleep(1.0)
                stop.set()
                thread.join(timeout=30)
                res.kills[f"PostgreSQL during {seen}"] = res.kills.get(f"PostgreSQL during {seen}", 0) + 1
                res.submitted += len(submitted)
                finals = _finish_jobs(srv, res, [job_id, *submitted], timeout, log=log)
                f = finals.get(job_id)
                log(f"run {run}: PostgreSQL restarted during {seen}; job {f and f['state']} after "
                    f"{f and f['attempts']} attempts; {len(submitted)} jobs submitted around it; answers {codes}")
            res.notes.append("answers while PostgreSQL restarted: " + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())))
            res.notes += [f"5xx without Retry-After: {b}" for b in bad[:10]]
            res.api_errors = len(bad)
    res.seconds = time.monotonic() - t0
    return res


def mount_tmpfs(path: Path, size_mb: int) -> str | None:
    """Mount a tmpfs of ``size_mb`` at ``path`` (root only). None when mounted, else why not."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "not root"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "kiln-chaos", str(path)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run_disk_full(*, size_mb: int = 64, timeout: float = 300.0, work: Path | None = None, mode: str = "embedded",
                  srv: Server | None = None, log=print) -> Result:
    """Scenario 5: the storage root is a small tmpfs (needs root: ``mount -t tmpfs``), filled so that the convert
    stage's 16 MB output cannot fit. The job fails with ``storage_full``, nothing half-published stays visible,
    the space comes back; with the filler removed the same job succeeds. With ``srv``, its storage root must
    already be a tmpfs (the short test mounts one)."""
    res = Result(f"5: disk full on the storage root (a {size_mb} MB tmpfs)" if srv is None
                 else "5: disk full on the storage root (a tmpfs)", mode=mode)
    t0 = time.monotonic()
    with _workdir(work) as work, (contextlib.nullcontext(({}, None, None)) if srv is not None
                                  else private_backing(mode, work)) as (env, _pg, _rds):
        storage = srv.storage if srv is not None else work / "storage"
        own_mount = srv is None
        why = (None if os.path.ismount(storage) else "the shared server's storage root is not a tmpfs") \
            if srv is not None else mount_tmpfs(storage, size_mb)
        if why is not None:
            res.notes.append(f"skipped: cannot mount a tmpfs here ({why})")
            return res
        try:
            repo = install_model("wide", storage, work)
            with (contextlib.nullcontext(srv) if srv is not None else Server(storage, work / "serve.log", **env)) as srv:
                _wipe_stage_outputs(storage)
                srv.wait_worker()
                spec = {"model": repo, "dtype": "float32", "labels": {"chaos": "disk-full"}}
                filler = storage / "filler"
                free = shutil.disk_usage(storage).free
                with open(filler, "wb") as fh:  # leave 4 MB: the fetch record fits, the 16 MB checkpoint does not
                    fh.truncate(0)
                    fh.write(b"\0" * max(0, free - (4 << 20)))
                free_before = shutil.disk_usage(storage).free
                job_id = srv.submit(spec)
                res.submitted += 1
                final = srv.wait_terminal(job_id, timeout)
                if final is None:
                    res.stuck += 1
                else:
                    err = final.get("error") or {}
                    res.finished_once += final["state"] == "failed" and err.get("code") == "storage_full"
                    res.notes.append(f"full disk: {final['state']} after {final['attempts']} attempt(s): "
                                     f"{err.get('code')}: {err.get('message')} (hint: {err.get('hint')})")
                time.sleep(1.0)
                free_after = shutil.disk_usage(storage).free
                res.notes.append(f"free before the job {free_before >> 10} KiB, after its failure {free_after >> 10} KiB")
                expected = {(s["name"], s["key"]) for s in (final or {}).get("stages", []) if s.get("key")}
                _count(res, audit_storage(storage, expected))
                if free_after < free_before - (512 << 10):
                    res.notes.append("space NOT reclaimed")
                    res.temp_left += 1
                filler.unlink()
                again = srv.submit({**spec, "labels": {"chaos": "disk-freed"}})
                res.submitted += 1
                t_free = time.monotonic()
                finals = _finish_jobs(srv, res, [again], timeout, log=log)
                if again in finals:
                    res.recovery_s.append(time.monotonic() - t_free)
                _api_errors(res, srv)
                log(f"disk full: {final and final['state']} ({(final or {}).get('error')}); after freeing: "
                    f"{finals.get(again, {}).get('state')}")
        finally:
            if own_mount:
                unmount(storage)
    res.seconds = time.monotonic() - t0
    return res


def run_race(runs: int = 3, *, timeout: float = 300.0, work: Path | None = None, mode: str = "embedded",
             log=print) -> Result:
    """Scenario 7: a second worker (`kiln worker`) beside `kiln serve`'s, two jobs with the same spec submitted
    together, so both compute the same content-addressed stage keys at once: one output per key, all files
    matching their sha256, both jobs succeeded."""
    res = Result("7: two workers racing on the same stage keys", mode=mode)
    t0 = time.monotonic()
    with _workdir(work) as work, private_backing(mode, work) as (env, _pg, _rds):
        storage = work / "storage"
        repo = install_model("wide", storage, work)
        with Server(storage, work / "serve.log", **env) as srv:
            with open(work / "worker2.log", "ab") as wlog:
                second = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--name", f"kiln-second-{os.getpid()}@chaos"],
                                          cwd=ROOT, env=srv.env, stdout=wlog, stderr=subprocess.STDOUT,
                                          start_new_session=True)
            try:
                deadline = time.monotonic() + 180
                while len(srv.get("/v1/workers").json()["workers"]) < 2 and time.monotonic() < deadline:
                    time.sleep(0.3)
                raced = 0
                for run in range(runs):
                    _wipe_stage_outputs(storage)
                    spec = {"model": repo, "dtype": "float32",
                            "quantization": {"algo": "W8A16", "calibration": {"samples": 4, "seq_len": 32}}}
                    ids = [srv.submit({**spec, "labels": {"race": f"{run}-{i}"}}) for i in range(2)]
                    res.submitted += 2
                    finals = _finish_jobs(srv, res, ids, timeout, log=log)
                    if len(finals) == 2:
                        a, b = (finals[i] for i in ids)
                        workers = set()
                        both = []
                        for sa, sb in zip(a["stages"], b["stages"], strict=False):
                            if sa.get("key") and sa["key"] == sb.get("key") and not sa.get("cache_hit") and not sb.get("cache_hit"):
                                both.append(sa["name"])
                        raced += bool(both)
                        log(f"run {run}: {a['state']}/{b['state']}; stages computed by both at once: {both or 'none'} {workers or ''}")
                res.notes.append(f"runs where both jobs computed the same key at the same time: {raced}/{runs}")
            finally:
                os.killpg(second.pid, signal.SIGTERM)
                try:
                    second.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    os.killpg(second.pid, signal.SIGKILL)
            _api_errors(res, srv)
    res.seconds = time.monotonic() - t0
    return res


def _delivery(client, job_id: str) -> tuple[bytes, float] | None:
    """The Redis ``unacked`` entry (delivery tag, delivery time) of the message that carries ``job_id``."""
    import base64

    for tag, raw in client.hgetall("unacked").items():
        try:
            body = json.loads(base64.b64decode(json.loads(raw)[0]["body"]))
        except (ValueError, KeyError, TypeError):
            continue
        if body and body[0] == [job_id]:
            score = client.zscore("unacked_index", tag)
            if score is not None:
                return tag, float(score)
    return None


def run_redelivery(runs: int = 3, *, visibility_s: int = 45, timeout: float = 300.0, work: Path | None = None,
                   log=print) -> Result:
    """Redis redelivery (scaled only): SIGKILL the whole worker while its job runs, then time when kombu puts
    the dead worker's unacknowledged message back on the queue. With ``unacked_restore_throttle=1`` and
    ``KILN_BROKER_RESTORE_INTERVAL_S`` (broker.py) it must come back within visibility timeout + interval of
    its delivery (kombu's defaults: up to ~100 s later). The job itself recovers earlier, through its lease;
    the redelivered message must not run it a second time."""
    from service.settings import Settings

    interval = Settings().broker_restore_interval_s
    res = Result(f"Redis redelivery after a worker kill (visibility {visibility_s} s, restore every {interval} s)",
                 mode="scaled")
    late: list[float] = []
    t0 = time.monotonic()
    with _workdir(work) as work, private_backing("scaled", work) as (env, _pg, rds):
        storage = work / "storage"
        repo = install_model("tiny", storage, work)
        with Server(storage, work / "serve.log", KILN_TASK_TIME_LIMIT_S=visibility_s - 10,
                    KILN_VISIBILITY_TIMEOUT_S=visibility_s, **env) as srv:
            client = rds.client()
            for run in range(runs):
                _wipe_stage_outputs(storage)
                pid = srv.wait_worker()
                job_id = srv.submit(job_spec(repo, run))
                res.submitted += 1
                job = _wait_stage(srv, job_id, ("quantize", "build", "evaluate"), timeout)
                held = _delivery(client, job_id)
                if held is None:
                    res.notes.append(f"run {run}: no unacked message for the job (it finished first?)")
                    _finish_jobs(srv, res, [job_id], timeout, log=log)
                    continue
                tag, delivered = held
                os.killpg(pid, signal.SIGKILL)
                kill_at = time.time()
                res.kills[f"worker during {job['stage']}"] = res.kills.get(f"worker during {job['stage']}", 0) + 1
                restored = None
                while time.time() < delivered + visibility_s + 120:
                    score = client.zscore("unacked_index", tag)
                    if score is None or float(score) != delivered:
                        restored = time.time()
                        break
                    time.sleep(0.1)
                if restored is None:
                    res.stuck += 1
                    res.notes.append(f"run {run}: the message was not redelivered within visibility + 120 s")
                else:
                    res.recovery_s.append(restored - kill_at)
                    late.append(restored - (delivered + visibility_s))
                time.sleep(3.0)  # the redelivered message reaches the new worker, which must skip the job
                _finish_jobs(srv, res, [job_id], timeout, settle_s=3.0, log=log)
                final = srv.job(job_id)
                log(f"run {run}: killed the worker during {job['stage']} {kill_at - delivered:.1f} s after delivery; "
                    f"message back {restored and restored - kill_at:.1f} s after the kill "
                    f"({restored and restored - delivered - visibility_s:+.1f} s past the visibility timeout); "
                    f"job {final['state']} after {final['attempts']} attempts")
            if late:
                res.notes.append(f"redelivery past the visibility timeout (s): median {statistics.median(late):.1f}, "
                                 f"max {max(late):.1f} (bound: the restore interval, {interval} s)")
                if max(late) > interval + 2.0:
                    res.stuck += 1
                    res.notes.append("redelivery later than the bound")
            _api_errors(res, srv)
    res.seconds = time.monotonic() - t0
    return res


def print_table(results: list[Result]) -> None:
    rows = [r.row() for r in results]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    for r in results:
        for note in r.notes:
            print(f"- {r.scenario.split(':')[0]}: {note}")


SCENARIOS = ("kill", "api-kill", "redis-restart", "pg-restart", "disk-full", "poison", "race", "redelivery", "load")
SCALED_ONLY = ("redis-restart", "pg-restart", "redelivery")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="all", help=f"comma-separated, from {', '.join(SCENARIOS)}; or all")
    ap.add_argument("--runs", type=int, default=6, help="runs of the kill scenario (one job each; stages cycle)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of api-kill, pg-restart, race and redelivery")
    ap.add_argument("--jobs", type=int, default=100, help="jobs queued when Redis restarts")
    ap.add_argument("--others", type=int, default=3, help="good jobs submitted with the poison job")
    ap.add_argument("--seconds", type=float, default=60.0, help="load: how long")
    ap.add_argument("--submitters", type=int, default=200, help="load: concurrent submitters")
    ap.add_argument("--pollers", type=int, default=1000, help="load: concurrent pollers")
    ap.add_argument("--model", choices=["tiny", "medium", "smollm2"], default="tiny",
                    help="kill and poison scenarios (medium: 4 x 512 Llama, 8k vocabulary: each stage lasts "
                         "0.1-2 s on 2 cores, so the kills land inside convert and quantize too)")
    ap.add_argument("--mode", choices=["embedded", "scaled", "both"], default="embedded",
                    help="scaled: PostgreSQL + Redis (private servers for the scenarios that restart them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per job")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    chosen = SCENARIOS if args.scenario == "all" else tuple(args.scenario.split(","))
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    results: list[Result] = []
    for mode in (["embedded", "scaled"] if args.mode == "both" else [args.mode]):
        for name in chosen:
            if name in SCALED_ONLY and mode != "scaled":
                if args.mode == "embedded":
                    print(f"{name}: scaled mode only (--mode scaled or both)")
                continue
            t = args.timeout
            try:
                _run_scenario(name, mode, args, t, results)
            except Exception as exc:  # one broken scenario must not lose the others' figures
                failed = Result(f"{name}: crashed", mode=mode, stuck=1)
                failed.notes.append(f"{type(exc).__name__}: {exc}")
                results.append(failed)
            print(json.dumps(asdict(results[-1])), flush=True)
    print(f"\nkiln chaos, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, model {args.model}")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    bad = any(r.stuck or r.duplicates or r.partial_visible or r.finished_once != r.submitted
              or r.artifacts_ok != r.artifacts or r.api_errors and r.scenario.startswith(("4", "8")) for r in results)
    return 1 if bad else 0


def _run_scenario(name: str, mode: str, args: argparse.Namespace, t: float, results: list[Result]) -> None:
    if name == "kill":
        results.append(run_kill(args.runs, model=args.model, seed=args.seed, timeout=t, mode=mode))
    elif name == "poison":
        results.append(run_poison(args.others, model=args.model, timeout=t, mode=mode))
    elif name == "api-kill":
        results.append(run_api_kill(args.repeat, timeout=t, mode=mode))
    elif name == "redis-restart":
        results.append(run_redis_restart(args.jobs, timeout=max(t, 600.0)))
    elif name == "pg-restart":
        results.append(run_pg_restart(args.repeat, timeout=t))
    elif name == "disk-full":
        results.append(run_disk_full(timeout=t, mode=mode))
    elif name == "race":
        results.append(run_race(args.repeat, timeout=t, mode=mode))
    elif name == "redelivery":
        results.append(run_redelivery(args.repeat, timeout=t))
    elif name == "load":
        from benchmarks.chaos_load import run_load

        results.append(run_load(mode, seconds=args.seconds, submitters=args.submitters, pollers=args.pollers))


if __name__ == "__main__":
    sys.exit(main())

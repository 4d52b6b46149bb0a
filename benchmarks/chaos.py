"""Chaos runs against a real `kiln serve` and its supervised worker: on the embedded default (SQLite + file
broker) and, with ``--mode scaled``, on PostgreSQL + Redis.

Scenario 1 (``kill``): SIGKILL the worker at random points of every stage (fetch, convert, quantize,
build, evaluate, publish), alternating the whole worker (Celery main process + pool child, which
`kiln serve` respawns) and the pool child alone (Celery's main process forks a new one). Each run is
one job through every stage (W8A16 quantization, a torch engine build, an evaluation); the stage
outputs are wiped between runs so nothing is a cache hit.

Scenario 6 (``poison``): a job whose stage always crashes the worker stops after ``KILN_ATTEMPT_CAP``
attempts with a clear error, while the other jobs submitted with it all succeed.

Each scenario reports: jobs submitted, finished exactly once (terminal, and no write to the row after
that), artifacts whose files all match their manifest sha256, duplicate stage outputs (committed key
directories no job stage refers to), partial directories visible (a key directory without a
manifest), temporary directories left behind, jobs stuck (not terminal within the timeout), and
recovery time (kill -> the job claimed again by a live worker). Run:

    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py                      # both scenarios, 6 kill runs
    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --scenario kill --runs 20 --seed 7
    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --model smollm2      # the real SmolLM2-135M (slower)
    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --mode both          # also PostgreSQL + Redis

The tiny model is a random 2-layer Llama made here (never downloaded); SmolLM2 comes from the local
cache (``service.compiler.sources.smollm2``). ``run_kill`` / ``run_poison`` are what ``tests/service/test_chaos.py``
calls for its short variant.
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


def make_tiny_llama(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
                     ).save_pretrained(out, safe_serialization=True)
    return out


def install_model(model: str, storage: Path, work: Path) -> str:
    from service.compiler.sources.smollm2 import install_into_hf_cache

    if model == "smollm2":
        from service.compiler.sources.smollm2 import smollm2_hf_dir

        install_into_hf_cache(smollm2_hf_dir(), storage / "hf-cache", repo_id=SMOLLM2_REPO)
        return SMOLLM2_REPO
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

    def __init__(self, storage: Path, log: Path, **env_extra):
        self.storage, self.log = storage, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        self.env.update({
            "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "KILN_STORAGE": str(storage),
            "KILN_LEASE_TTL_S": "4", "KILN_HEARTBEAT_S": "0.5", "KILN_RECONCILE_INTERVAL_S": "1",
            "KILN_WORKER_HEARTBEAT_S": "1", "KILN_WORKER_RESTART_BACKOFF_S": "0.5",
            "KILN_STAGE_PLUGINS": "benchmarks.chaos_stages",
            "KILN_TASK_TIME_LIMIT_S": "600", "KILN_VISIBILITY_TIMEOUT_S": "900",
        })
        self.env.update({k: str(v) for k, v in env_extra.items()})
        self.proc: subprocess.Popen | None = None
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

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(self.port),
                                      "--grpc-port", "-1"], cwd=ROOT, env=self.env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if self._http.get("/v1/workers").json()["workers"]:
                    return self
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"kiln serve did not come up: {self.log.read_text()[-2000:]}")

    def __exit__(self, *_exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
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
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


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


def run_kill(runs: int = 6, *, model: str = "tiny", seed: int = 0, timeout: float = 300.0, work: Path | None = None,
             mode: str = "embedded", log=print) -> Result:
    rng = random.Random(seed)
    res = Result("1: SIGKILL worker at random points of every stage", mode=mode)
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="kiln-chaos-")) if own else work
    storage = work / "storage"
    repo = install_model(model, storage, work)
    t0 = time.monotonic()
    try:
        with backing(mode) as env, Server(storage, work / "serve.log", **env) as srv:
            for run in range(runs):
                target = STAGES[run % len(STAGES)]
                whole = run % 2 == 0  # alternate: the whole worker, the pool child only
                _wipe_stage_outputs(storage)
                pid = srv.wait_worker()
                job_id = srv.submit(job_spec(repo, run))
                res.submitted += 1
                # wait for the target stage (publish: the end of evaluate), then a random moment inside it
                watch = "evaluate" if target == "publish" else target
                deadline = time.monotonic() + timeout
                job = srv.job(job_id)
                while job["stage"] != watch and job["state"] not in TERMINAL and time.monotonic() < deadline:
                    time.sleep(0.02)
                    job = srv.job(job_id)
                time.sleep(rng.uniform(0.0, 0.4 if target != "publish" else 0.1))
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
                _settle_and_audit(srv, res, final, settle_s=2.5)
                expected = {(s["name"], s["key"]) for s in final["stages"] if s.get("key")}
                audit = audit_storage(storage, expected)
                _count(res, audit)
                log(f"run {run}: killed the {'worker' if whole else 'pool child'} during {seen}; "
                    f"{final['state']} after {final['attempts']} attempts; recovery {rec or 0:.1f}s; {audit}")
            e = srv.embedded()
            res.notes.append(f"embedded worker restarts: {e['restarts']}")
            _api_errors(res, srv)
    finally:
        res.seconds = time.monotonic() - t0
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return res


def run_poison(others: int = 3, *, model: str = "tiny", attempt_cap: int = 3, timeout: float = 300.0,
               work: Path | None = None, mode: str = "embedded", log=print) -> Result:
    res = Result(f"6: poison job (KILN_ATTEMPT_CAP={attempt_cap}) + {others} good jobs", mode=mode)
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="kiln-chaos-")) if own else work
    storage = work / "storage"
    repo = install_model(model, storage, work)
    t0 = time.monotonic()
    try:
        with backing(mode) as env, Server(storage, work / "serve.log", KILN_ATTEMPT_CAP=attempt_cap, **env) as srv:
            srv.wait_worker()
            poison = srv.submit({"model": repo, "dtype": "float32", "labels": {"poison": "worker"}})
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
                res.kills["poison stage (worker)"] = p["attempts"] - 1
            expected = {(s["name"], s["key"]) for f in finals.values() for s in f["stages"] if s.get("key")}
            time.sleep(2.0)  # one reconcile pass after the last death
            audit = audit_storage(storage, expected)
            _count(res, audit)
            res.notes.append(f"embedded worker restarts: {srv.embedded()['restarts']}")
            _api_errors(res, srv)
            log(f"poison: {p and p['state']}; good jobs succeeded: {sum(finals[g]['state'] == 'succeeded' for g in good if g in finals)}/{len(good)}")
    finally:
        res.seconds = time.monotonic() - t0
        if own:
            shutil.rmtree(work, ignore_errors=True)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=["kill", "poison", "all"], default="all")
    ap.add_argument("--runs", type=int, default=6, help="kill runs (one job each; stages cycle)")
    ap.add_argument("--others", type=int, default=3, help="good jobs submitted with the poison job")
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--mode", choices=["embedded", "scaled", "both"], default="embedded",
                    help="scaled: a throwaway PostgreSQL database (KILN_CHAOS_PG_URL) and Redis (KILN_CHAOS_REDIS_URL)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per job")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    results = []
    for mode in (["embedded", "scaled"] if args.mode == "both" else [args.mode]):
        if args.scenario in ("kill", "all"):
            results.append(run_kill(args.runs, model=args.model, seed=args.seed, timeout=args.timeout, mode=mode))
        if args.scenario in ("poison", "all"):
            results.append(run_poison(args.others, model=args.model, timeout=args.timeout, mode=mode))
    print(f"\nkiln chaos, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, model {args.model}")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    bad = any(r.stuck or r.duplicates or r.partial_visible or r.finished_once != r.submitted
              or r.artifacts_ok != r.artifacts for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

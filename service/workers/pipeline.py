"""The pipeline runner: stages in a registered list, content-addressed outputs, a fenced lease.

A stage is a plain function ``(ctx, input_dir, output_dir, stage_config, progress) -> dict`` wrapped in
a :class:`Stage`. Adding one (quantize, build, evaluate…) is one line::

    register_stage(Stage("quantize", quantize_stage, config=quant_config, handles="quantization"), after="convert")

Each stage's output lives at ``stages/<name>/<key>/`` with key = sha256(input key, normalized stage
config, compiler version), so a retry or a resubmission reuses finished stages (a cache hit) and a
crashed job resumes at the stage that did not finish. Publishing is the last, fenced write of the
job row: the artifacts become visible to users at once, and only once.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.domain.errors import InvalidSpec
from service.domain.job import ArtifactRef, JobError, StageRecord
from service.domain.spec import JobSpec
from service.settings import Settings
from service.store import ArtifactStore, JobStore, Lease

log = logging.getLogger("kiln.pipeline")

Progress = Callable[[float, str], None]


@dataclass
class StageContext:
    job_id: str
    spec: JobSpec
    settings: Settings
    artifacts: ArtifactStore
    check: Callable[[], None] = lambda: None  # raises if the job was cancelled or the lease lost
    outputs: dict[str, Path] = field(default_factory=dict)  # finished earlier stages of this job: name -> dir

    def hf_token(self) -> str | None:
        """Read at the moment of use, from the operator's reference; never stored or logged."""
        return self.settings.read_hf_token()


StageFn = Callable[[StageContext, "Path | None", Path, dict, Progress], dict]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    config: Callable[[JobSpec], dict | None]  # None: the spec does not need this stage
    artifact: str | None = None  # publish this stage's output under this artifact name
    handles: str | None = None  # the JobSpec section this stage serves ("quantization", "build", …)
    keyed_by_output: bool = False  # key from what the stage produced (fetch: the resolved commit)
    weight: float = 1.0  # share of the job's progress bar
    keep_on_failure: bool = False  # its artifact stays attached when a quality gate fails the job (reports)


STAGES: list[Stage] = []


def load_stage_plugins(settings: Settings) -> None:
    """Import the modules that register stages: fetch/convert, quantize/build/evaluate, and
    ``KILN_STAGE_PLUGINS``."""
    importlib.import_module("service.workers.stages")
    importlib.import_module("service.workers.compile_stages")  # quantize, build, evaluate
    for name in filter(None, (m.strip() for m in settings.stage_plugins.split(","))):
        importlib.import_module(name)


def register_stage(stage: Stage, *, after: str | None = None) -> None:
    """Append a stage (or insert it right after ``after``); re-registering a name replaces it."""
    existing = [i for i, s in enumerate(STAGES) if s.name == stage.name]
    if existing:
        STAGES[existing[0]] = stage
        return
    if after is None:
        STAGES.append(stage)
    else:
        index = next(i for i, s in enumerate(STAGES) if s.name == after)
        STAGES.insert(index + 1, stage)


def compiler_version() -> str:
    try:
        from service.compiler import __version__
    except ImportError:  # pragma: no cover
        __version__ = "unknown"
    return __version__


def stage_key(input_key: str, stage: str, config: dict) -> str:
    canonical = json.dumps({"input": input_key, "stage": stage, "config": config, "compiler": compiler_version()},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def planned_stages(spec: JobSpec) -> list[tuple[Stage, dict]]:
    out = []
    for stage in STAGES:
        cfg = stage.config(spec)
        if cfg is not None:
            out.append((stage, cfg))
    return out


def validate_spec(spec: JobSpec) -> None:
    """Refuse specs asking for work no installed stage does (e.g. quantization before it lands)."""
    handled = {s.handles for s in STAGES if s.handles}
    wanted = {"quantization": spec.quantization.requested, "build": spec.build is not None,
              "evaluation": spec.evaluation is not None}
    for section, asked in wanted.items():
        if asked and section not in handled:
            raise InvalidSpec(f"{section} is not available on this server: no stage handles it yet",
                              hint=f"submit without '{section}'")


# -- running one job --------------------------------------------------------------------------

class JobCancelled(Exception):
    pass


class QualityGateFailed(Exception):
    """A stage finished (its output is stored) but its verdict fails the job, e.g. an accuracy report
    below the user's thresholds. The stage's summary carries ``gate`` = {passed, code, message, hint}."""

    def __init__(self, gate: dict):
        super().__init__(gate.get("message", "quality gate failed"))
        self.code = gate.get("code") or "accuracy_below_threshold"
        self.message = gate.get("message") or "quality gate failed"
        self.hint = gate.get("hint") or ""


class LeaseLost(Exception):
    pass


PERMANENT_CODES = {
    "invalid_argument", "unsupported_architecture", "invalid_mapping", "model_not_found", "unsafe_weights",
    "malformed_weights", "weights_mismatch", "invalid_checkpoint", "output_exists",
    "invalid_tokenizer",
    # build (service/compiler/build/config.py)
    "invalid_build_config", "unknown_backend", "backend_unavailable", "target_unavailable", "engine_does_not_fit",
    # quality gates
    "accuracy_below_threshold",
}


_SECRET_RE = re.compile(r"\b(hf_[A-Za-z0-9]{8,}|api_[A-Za-z0-9]{8,})\b")


def redact(text: str) -> str:
    """Hide anything shaped like a Hugging Face token before it reaches a job row or a log line."""
    return _SECRET_RE.sub("hf_***", text)


def _is_permanent(exc: BaseException) -> bool:
    return getattr(exc, "code", None) in PERMANENT_CODES


@dataclass
class _Heartbeat:
    store: JobStore
    lease: Lease
    settings: Settings
    cancelled: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._loop, name=f"lease-{self.lease.job_id[:8]}", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                ours, cancel = self.store.heartbeat(self.lease, self.settings.lease_ttl_s)
            except Exception:  # a database blip: keep trying until the lease runs out
                log.warning("heartbeat failed for job %s", self.lease.job_id, exc_info=True)
                continue
            if not ours:
                self.lost.set()
                return
            if cancel:
                self.cancelled.set()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(self.lease.job_id)
        if self.cancelled.is_set():
            raise JobCancelled(self.lease.job_id)


class PipelineRunner:
    """Runs one job under a lease. ``enqueue(job_id, queue, countdown)`` re-publishes for retries."""

    def __init__(self, settings: Settings, store: JobStore, artifacts: ArtifactStore, worker_id: str,
                 enqueue: Callable[[str, str, float], None] | None = None,
                 on_finished: Callable[[str], None] | None = None):
        self.settings = settings
        self.store = store
        self.artifacts = artifacts
        self.worker_id = worker_id
        self.enqueue = enqueue
        self.on_finished = on_finished

    def run(self, job_id: str) -> str:
        lease = self.store.claim(job_id, self.worker_id, self.settings.lease_ttl_s)
        if lease is None:
            return "skipped"  # finished, cancelled, or another worker holds a live lease
        job = self.store.get(job_id)
        assert job is not None
        if lease.attempts > self.settings.attempt_cap:
            last = job.error or JobError(code="internal", message="worker lost while running the job")
            self._finish(lease, "failed", error=JobError(
                code=last.code, message=f"gave up after {lease.attempts - 1} attempts: {last.message}", hint=last.hint))
            return "failed"
        self._reclaim_dead_attempts(lease)
        hb = _Heartbeat(self.store, lease, self.settings)
        hb.start()
        try:
            return self._run_stages(lease, job.spec, hb)
        finally:
            hb.stop()

    def _reclaim_dead_attempts(self, lease: Lease) -> None:
        """Earlier attempts of this job hold no lease any more (this claim fenced them out): their
        half-written temp outputs (a SIGKILLed worker's) go now, not hours later."""
        try:
            freed = self.artifacts.reclaim_temps(lambda: {(lease.job_id, lease.token)}, job_id=lease.job_id)
        except OSError:
            log.warning("job %s: could not reclaim earlier attempts' temp outputs", lease.job_id, exc_info=True)
            return
        if freed.removed:
            log.info("job %s attempt %d: reclaimed %s", lease.job_id, lease.attempts, freed.line())

    def _run_stages(self, lease: Lease, spec: JobSpec, hb: _Heartbeat) -> str:
        plan = planned_stages(spec)
        records = [StageRecord(name=s.name) for s, _ in plan] + [StageRecord(name="publish")]
        total_weight = sum(s.weight for s, _ in plan) or 1.0
        done_weight = 0.0
        last_write = [0.0]

        def write(**values) -> None:
            if not self.store.update(lease.job_id, token=lease.token, stages=records, **values):
                raise LeaseLost(lease.job_id)

        origin = {"model": spec.model, "revision": spec.revision}
        if spec.is_local_source:  # a file on shared storage; the stages after fetch are keyed by its content
            assert spec.source is not None
            origin = {"source": spec.source.kind, "path": spec.source.path}
        input_key = hashlib.sha256(json.dumps(origin).encode()).hexdigest()
        input_dir: Path | None = None
        artifacts: list[ArtifactRef] = []
        outputs: dict[str, Path] = {}
        kept_on_failure: set[str] = set()
        record = records[0]
        try:
            for (stage, cfg), record in zip(plan, records, strict=False):
                hb.check()
                record.state, record.started_at = "running", time.time()
                write(stage=stage.name, progress=done_weight / total_weight, message=f"{stage.name}: starting")

                def progress(frac: float, message: str, _stage=stage, _done=done_weight) -> None:
                    hb.check()
                    now = time.monotonic()
                    if now - last_write[0] >= 0.5 or frac >= 1.0:
                        last_write[0] = now
                        overall = (_done + max(0.0, min(1.0, frac)) * _stage.weight) / total_weight
                        write(progress=round(overall, 4), message=f"{_stage.name}: {message}"[:500])

                ctx = StageContext(lease.job_id, spec, self.settings, self.artifacts, check=hb.check,
                                   outputs=dict(outputs))
                key = None if stage.keyed_by_output else stage_key(input_key, stage.name, cfg)
                if key is not None and self.artifacts.has(stage.name, key):
                    manifest = self.artifacts.manifest(stage.name, key)
                    record.cache_hit = True
                else:
                    tmp = self.artifacts.new_tmp(stage.name, owner=(lease.job_id, lease.token))
                    try:
                        summary = stage.run(ctx, input_dir, tmp, cfg, progress) or {}
                        hb.check()
                        if key is None:
                            key = stage_key(input_key, stage.name, {**cfg, "content": summary.get("content_key")})
                            if self.artifacts.has(stage.name, key):
                                record.cache_hit = True
                        manifest = self.artifacts.commit(stage.name, key, tmp, extra={
                            "summary": summary, "input_key": input_key, "config": cfg,
                            "compiler_version": compiler_version()})
                    finally:
                        self.artifacts.discard(tmp)
                summary = manifest.get("summary", {})
                record.key, record.summary = key, {k: v for k, v in summary.items() if k != "output_dir"}
                record.state, record.finished_at = "done", time.time()
                record.seconds = round(record.finished_at - record.started_at, 3)
                input_dir = Path(summary["output_dir"]) if summary.get("output_dir") else self.artifacts.path(stage.name, key)
                input_key = key
                outputs[stage.name] = input_dir
                if stage.artifact:
                    artifacts = [a for a in artifacts if a.name != stage.artifact]
                    artifacts.append(ArtifactRef(name=stage.artifact, stage=stage.name, key=key))
                    if stage.keep_on_failure:
                        kept_on_failure.add(stage.artifact)
                gate = summary.get("gate")
                if isinstance(gate, dict) and gate.get("passed") is False:
                    raise QualityGateFailed(gate)
                done_weight += stage.weight
            hb.check()
            record = records[-1]
            record.state, record.started_at = "done", time.time()
            record.finished_at, record.seconds = record.started_at, 0.0
            ok = self._finish(lease, "succeeded", artifacts=artifacts, stages=records, progress=1.0, message="published")
            return "succeeded" if ok else "lease_lost"
        except LeaseLost:
            log.warning("job %s: lease lost (token %s); another worker owns it now", lease.job_id, lease.token)
            return "lease_lost"
        except QualityGateFailed as exc:
            # the stage itself finished (its record says so); the job fails with only its reports attached
            err = JobError(code=exc.code, message=redact(exc.message)[:2000], hint=exc.hint)
            kept = [a for a in artifacts if a.name in kept_on_failure]
            log.info("job %s failed its quality gate: %s", lease.job_id, err.message)
            return "failed" if self._finish(lease, "failed", error=err, stages=records, artifacts=kept,
                                            message=f"failed: {exc.code}") else "lease_lost"
        except JobCancelled:
            record.state = "failed" if record.state == "running" else record.state
            return "cancelled" if self._finish(lease, "cancelled", stages=records, message="cancelled by request") else "lease_lost"
        except Exception as exc:
            record.state = "failed"
            err = JobError(code=getattr(exc, "code", "internal") if _is_permanent(exc) else "internal",
                           message=redact(getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")[:2000],
                           hint=getattr(exc, "hint", "") or "")
            if _is_permanent(exc) or lease.attempts >= self.settings.attempt_cap:
                log.info("job %s failed: %s", lease.job_id, err.message)
                return "failed" if self._finish(lease, "failed", error=err, stages=records) else "lease_lost"
            log.warning("job %s attempt %d failed (%s); retrying", lease.job_id, lease.attempts, err.message)
            if self.store.release(lease, state="queued", error=err, stages=records, enqueued_at=time.time(),
                                  message=f"attempt {lease.attempts} failed; retrying") and self.enqueue:
                self.enqueue(lease.job_id, spec.queue(), min(60.0, 2.0 ** lease.attempts))
            return "retry"

    def _finish(self, lease: Lease, state: str, **values) -> bool:
        """The fenced terminal write. False: a newer lease owns the job and this run's result is dropped."""
        if not self.store.release(lease, state=state, stage=None, finished_at=time.time(), **values):
            log.warning("job %s: stale lease %s, %s result dropped", lease.job_id, lease.token, state)
            return False
        if self.on_finished is not None:
            try:
                self.on_finished(lease.job_id)
            except Exception:
                log.exception("completion hook failed for job %s", lease.job_id)
        return True

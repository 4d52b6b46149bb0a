"""Pipeline runner in-process on SQLite and PostgreSQL: attempt cap, permanent errors, secrets kept out of rows."""

from __future__ import annotations

import os

import pytest

from service.compiler.errors import WeightsMismatch
from service.domain import JobSpec
from service.settings import Settings
from service.store import ArtifactStore
from service.workers import pipeline
from service.workers.pipeline import PipelineRunner, Stage, register_stage


@pytest.fixture
def failing_stage():
    calls = []

    def boom(ctx, input_dir, output_dir, cfg, progress):
        calls.append(cfg["kind"])
        progress(0.5, "half way")
        if cfg["kind"] == "transient":
            raise RuntimeError("disk on fire; token hf_abcdefghijklmnopqrstuvwxyz0123 was set")
        raise WeightsMismatch("model.layers.0.mlp.fc.weight has shape [3, 4], config implies [4, 4]")

    register_stage(Stage("boom", boom, config=lambda s: {"kind": s.labels["boom"]} if "boom" in s.labels else None))
    yield calls
    pipeline.STAGES[:] = [s for s in pipeline.STAGES if s.name != "boom"]


def _runner(job_store, tmp_path, enqueued):
    settings = Settings(storage=tmp_path, attempt_cap=2, heartbeat_s=0.2)
    return PipelineRunner(settings, job_store, ArtifactStore(tmp_path), "w-test",
                          enqueue=lambda job_id, queue, countdown: enqueued.append((job_id, countdown)))


def test_transient_errors_retry_until_the_attempt_cap_then_fail(job_store, tmp_path, failing_stage):
    enqueued = []
    runner = _runner(job_store, tmp_path, enqueued)
    job, _ = job_store.create(tenant="t", spec=JobSpec(model="org/m", labels={"boom": "transient"}),
                              idempotency_key=None, queue="cpu")
    backup = list(pipeline.STAGES)
    pipeline.STAGES[:] = [s for s in pipeline.STAGES if s.name == "boom"]  # the failing stage alone
    try:
        assert runner.run(job.id) == "retry"
        queued = job_store.get(job.id)
        assert queued.state == "queued" and queued.attempts == 1 and enqueued[0][0] == job.id
        assert runner.run(job.id) == "failed"
    finally:
        pipeline.STAGES[:] = backup
    failed = job_store.get(job.id)
    assert failed.state == "failed" and failed.attempts == 2 and len(failing_stage) == 2
    assert failed.error.code == "internal" and "disk on fire" in failed.error.message
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in failed.model_dump_json()
    assert runner.run(job.id) == "skipped"  # a late duplicate message does nothing


def test_compiler_errors_fail_at_once_with_their_code(job_store, tmp_path, failing_stage):
    runner = _runner(job_store, tmp_path, [])
    job, _ = job_store.create(tenant="t", spec=JobSpec(model="org/m", labels={"boom": "permanent"}),
                              idempotency_key=None, queue="cpu")
    backup = list(pipeline.STAGES)
    pipeline.STAGES[:] = [s for s in pipeline.STAGES if s.name == "boom"]
    try:
        assert runner.run(job.id) == "failed"
    finally:
        pipeline.STAGES[:] = backup
    failed = job_store.get(job.id)
    assert failed.attempts == 1 and failed.error.code == "weights_mismatch"
    assert "mlp.fc.weight" in failed.error.message
    assert [s.state for s in failed.stages] == ["failed", "pending"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "stages" / "boom").iterdir())


def test_hf_token_is_read_by_reference_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_HF_TOKEN", "hf_secretvalue123456")
    settings = Settings(storage=tmp_path, hf_token_env="MY_HF_TOKEN")
    assert settings.read_hf_token() == "hf_secretvalue123456"
    assert "hf_secretvalue" not in settings.model_dump_json()
    secret = tmp_path / "token"
    secret.write_text("hf_fromfile987654321\n")
    os.chmod(secret, 0o600)
    assert Settings(storage=tmp_path, hf_token_file=secret).read_hf_token() == "hf_fromfile987654321"

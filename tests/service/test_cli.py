"""`kiln` client commands against the shared `kiln serve`, and `kiln compile` in-process."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from .conftest import TINY_REPO, install_in_hf_cache
from .harness import ROOT, service_env


def kiln(server, *args, env=None, timeout=120):
    cmd = [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or server["env"], capture_output=True, text=True, timeout=timeout)


def test_submit_watch_status_download_resume_cancel_workers(server, tmp_path):
    url = ["--server", server["http"]]
    r = kiln(server, "submit", TINY_REPO, "--dtype", "float16", "--label", "via=cli", "--watch", *url)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.split()[0]
    assert "succeeded" in r.stderr and "100.0%" in r.stderr
    r = kiln(server, "status", job_id, *url)
    assert r.returncode == 0 and "succeeded" in r.stdout and "convert" in r.stdout
    r = kiln(server, "status", *url)
    assert job_id in r.stdout

    # a partial file from an interrupted download is resumed with Range, then verified
    out = tmp_path / "out"
    target = out / "checkpoint" / "rank0.safetensors"
    kiln(server, "download", job_id, str(out), *url)
    full = target.read_bytes()
    target.unlink()
    target.with_name("rank0.safetensors.part").write_bytes(full[:1234])
    r = kiln(server, "download", job_id, str(out), *url)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(full).hexdigest()
    # corrupt partial data is detected by the checksum
    target.unlink()
    target.with_name("rank0.safetensors.part").write_bytes(b"x" * 1234)
    r = kiln(server, "download", job_id, str(out), *url)
    assert r.returncode != 0 and "sha256" in r.stderr

    r = kiln(server, "workers", *url)
    assert r.returncode == 0 and "queues=cpu" in r.stdout
    r = kiln(server, "submit", TINY_REPO, "--label", "slow=30", *url)
    slow_id = r.stdout.split()[0]
    r = kiln(server, "cancel", slow_id, *url)
    assert r.returncode == 0 and slow_id in r.stdout
    r = kiln(server, "watch", slow_id, *url)
    assert r.returncode == 1 and "cancelled" in r.stderr
    r = kiln(server, "submit", TINY_REPO, "--tp-size", "3", *url)
    assert r.returncode == 2 and "invalid_mapping" in r.stderr


def test_compile_runs_the_whole_pipeline_in_process(tmp_path, tiny_model_dir):
    env = service_env(tmp_path / "storage")
    install_in_hf_cache(tiny_model_dir, tmp_path / "storage" / "hf-cache", TINY_REPO)
    r = kiln(None, "compile", TINY_REPO, "--dtype", "float32", "--tp-size", "2", env=env)
    assert r.returncode == 0, r.stderr
    artifact = r.stdout.strip().split(": ", 1)[1]
    manifest = json.loads((tmp_path / "storage" / "stages" / "convert" / artifact.rsplit("/", 1)[1] / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == {"config.json", "rank0.safetensors", "rank1.safetensors"}


def test_serve_refuses_non_loopback_without_keys(tmp_path):
    env = service_env(tmp_path / "storage")
    r = kiln(None, "serve", "--host", "0.0.0.0", "--port", "0", env=env, timeout=60)
    assert r.returncode == 2 and "without API keys" in r.stderr


def test_refusals_print_the_servers_code_message_and_hint(server):
    url = ["--server", server["http"]]
    r = kiln(server, "status", "0123456789abcdef", *url)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "kiln status: HTTP 404 job_not_found: job 0123456789abcdef not found" in r.stderr
    assert "hint: `kiln status` lists the jobs this API key can see" in r.stderr
    r = kiln(server, "submit", "kiln-test/not-in-the-cache", *url)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "kiln submit: HTTP 422 model_not_found: " in r.stderr and "kiln-test/not-in-the-cache" in r.stderr
    assert "\nhint: " in r.stderr  # the server's hint, as it sent it
    r = kiln(server, "download", "0123456789abcdef", "out", *url)
    assert r.returncode == 2 and "HTTP 404 job_not_found" in r.stderr


def test_gc_reclaims_orphaned_temp_dirs_and_reports_what_it_freed(tmp_path):
    """`kiln gc`: a dead attempt's temp outputs go, a live lease's stay, the report says count and bytes."""
    from service.settings import Settings
    from service.store import ArtifactStore, JobStore, make_engine, migrate

    env = service_env(tmp_path / "storage")
    settings = Settings(storage=tmp_path / "storage")
    engine = make_engine(settings.db_url)
    migrate(engine)
    store = JobStore(engine)
    from service.domain import JobSpec

    live_job, _ = store.create(tenant="t", spec=JobSpec(model=TINY_REPO), idempotency_key=None, queue="cpu")
    dead_job, _ = store.create(tenant="t", spec=JobSpec(model=TINY_REPO), idempotency_key=None, queue="cpu")
    live = store.claim(live_job.id, "w1", ttl=600)
    dead = store.claim(dead_job.id, "w2", ttl=600)
    store.update(dead_job.id, state="failed", lease_owner=None, lease_expires_at=None)  # that attempt is over
    artifacts = ArtifactStore(settings.storage_root)
    kept = artifacts.new_tmp("convert", owner=(live.job_id, live.token))
    gone = artifacts.new_tmp("convert", owner=(dead.job_id, dead.token))
    nested = gone.parent / f".{gone.name}.tmp-abcdef012345"
    for d, n in ((kept, 10), (gone, 3000), (nested, 4000)):
        d.mkdir()
        (d / "rank0.safetensors").write_bytes(b"z" * n)
    store.close()
    engine.dispose()

    r = subprocess.run([sys.executable, "-m", "service.cli", "gc", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "would free 2 orphaned temp dirs, 7000 bytes" in r.stdout and gone.exists()
    r = subprocess.run([sys.executable, "-m", "service.cli", "gc", "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["count"], report["bytes"], report["kept"]) == (2, 7000, 1)
    assert sorted(report["removed"]) == sorted([str(gone), str(nested)])
    assert kept.exists() and not gone.exists() and not nested.exists()

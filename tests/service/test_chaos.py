"""Short variants of `benchmarks/chaos.py` (the full runs and their README table come from the script), run by
default: one `kiln serve` (embedded, short leases) shared by the SIGKILL, poison, disk-full and API-kill
variants, so that each pays for its job and not for a server start. As root its storage root is a 256 MB tmpfs,
which the disk-full variant fills (elsewhere that one variant is skipped). The Redis redelivery bound is `test_broker_redelivery.py`; PostgreSQL restarts (503 + Retry-After) are
`test_backend_faults.py`.
"""

from __future__ import annotations

import pytest

from benchmarks.chaos import (
    Server,
    install_model,
    mount_tmpfs,
    run_api_kill,
    run_disk_full,
    run_kill,
    run_poison,
    unmount,
)


def _clean(r):
    print(r.row(), r.notes)
    assert r.stuck == 0, r.notes
    assert r.finished_once == r.submitted, r.notes
    assert r.artifacts_ok == r.artifacts > 0, r.notes
    assert (r.duplicates, r.partial_visible, r.temp_left) == (0, 0, 0), r.notes


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """`kiln serve` with the chaos settings (lease 4 s, reconcile 1 s, the poison stage plugin) and an attempt
    cap of 2: a SIGKILLed job succeeds on its second attempt, the poison job gives up after two."""
    work = tmp_path_factory.mktemp("chaos")
    why_not = mount_tmpfs(work / "storage", 256)
    try:
        for model in ("tiny", "wide"):
            install_model(model, work / "storage", work)
        with Server(work / "storage", work / "serve.log", KILN_ATTEMPT_CAP=2) as srv:
            yield srv, work, why_not
    finally:
        if why_not is None:
            unmount(work / "storage")


def test_chaos_sigkill_worker_mid_job_finishes_exactly_once(serve):
    srv, work, _ = serve
    r = run_kill(1, seed=1, timeout=120, work=work, srv=srv, light=True)
    _clean(r)
    assert r.succeeded == 1 and len(r.recovery_s) == 1, (r.row(), r.notes)
    assert "embedded worker restarts: 1" in r.notes, r.notes  # `kiln serve` respawned the killed worker


def test_chaos_poison_job_stops_at_the_attempt_cap_and_others_flow(serve):
    srv, work, _ = serve
    r = run_poison(1, attempt_cap=2, timeout=120, work=work, srv=srv, victim="child")
    _clean(r)
    assert r.succeeded == 1  # the good job; the poison job failed
    assert any("gave up after 2 attempts: worker lost" in n and "UNEXPECTED" not in n for n in r.notes), r.notes


def test_chaos_disk_full_fails_with_storage_full_then_space_is_back(serve):
    srv, work, why_not = serve
    if why_not is not None:
        pytest.skip(f"the storage root cannot be a tmpfs here: {why_not}")
    r = run_disk_full(timeout=120, work=work, srv=srv)
    _clean(r)
    assert r.submitted == 2 and r.succeeded == 1, r.notes  # storage_full, then the same job on the freed disk
    assert any("storage_full: no space left on the storage root" in n for n in r.notes), r.notes


def test_chaos_sigkill_api_mid_job_and_mid_download_resumes_with_the_right_sha256(serve):
    """Last: it kills and restarts the shared server (one kill: mid-download, and mid-job for a second job)."""
    srv, work, _ = serve
    r = run_api_kill(1, timeout=120, work=work, srv=srv, light=True)
    _clean(r)
    assert r.succeeded == 2 and "Range resumes after an API kill whose sha256 matched: 1/1" in r.notes, r.notes

"""Worker reliability settings: a sane soft time limit, and settings that cannot work refused at start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.settings import InvalidConfiguration, Settings
from service.workers.broker import make_celery

from .harness import ROOT, free_port, service_env


@pytest.mark.parametrize("hard, soft", [(6 * 3600, 21540.0), (600, 540.0), (61, 54.9), (60, 54.0), (30, 27.0)])
def test_soft_limit_is_the_hard_one_less_min_60s_or_10_percent(tmp_path, hard, soft):
    settings = Settings(storage=tmp_path, task_time_limit_s=hard)
    assert settings.soft_time_limit_s == soft
    app = make_celery(settings)
    assert app.conf.task_soft_time_limit == soft and app.conf.task_time_limit == hard


def test_explicit_soft_limit_is_used(tmp_path):
    settings = Settings(storage=tmp_path, task_time_limit_s=600, task_soft_time_limit_s=300)
    assert settings.soft_time_limit_s == 300.0
    assert make_celery(settings).conf.task_soft_time_limit == 300.0


@pytest.mark.parametrize("values, message", [
    ({"task_time_limit_s": 10}, "below the minimum of 30 s"),
    ({"task_time_limit_s": 900, "visibility_timeout_s": 900}, "must stay below KILN_VISIBILITY_TIMEOUT_S"),
    ({"task_time_limit_s": 600, "task_soft_time_limit_s": 600}, "KILN_TASK_SOFT_TIME_LIMIT_S=600 must be"),
    ({"task_time_limit_s": 600, "task_soft_time_limit_s": 0.5}, "must be at least 1"),
    ({"lease_ttl_s": 10, "heartbeat_s": 10}, "every lease would expire between two heartbeats"),
    ({"attempt_cap": 0}, "KILN_ATTEMPT_CAP=0"),
])
def test_settings_that_cannot_work_are_refused(tmp_path, values, message):
    settings = Settings(storage=tmp_path, **values)
    with pytest.raises(InvalidConfiguration, match=message):
        settings.check_reliability()
    with pytest.raises(InvalidConfiguration):
        make_celery(settings)


def test_settings_that_work_badly_are_warned_about(tmp_path):
    assert Settings(storage=tmp_path).check_reliability() == []
    warnings = Settings(storage=tmp_path, lease_ttl_s=10, heartbeat_s=8, reconcile_interval_s=30).check_reliability()
    assert any("one late heartbeat loses the lease" in w for w in warnings)
    assert any("KILN_RECONCILE_INTERVAL_S=30 is longer than KILN_LEASE_TTL_S=10" in w for w in warnings)
    warnings = Settings(storage=tmp_path, task_time_limit_s=600, task_soft_time_limit_s=595).check_reliability()
    assert any("leaves 5.0 s between the soft limit" in w for w in warnings)


@pytest.mark.parametrize("command", [["serve", "--no-worker", "--grpc-port", "-1"], ["worker"]])
def test_serve_and_worker_refuse_to_start_with_a_limit_below_the_minimum(tmp_path, command):
    env = service_env(tmp_path / "storage", KILN_TASK_TIME_LIMIT_S="20")
    if command[0] == "serve":
        command = [*command, "--port", str(free_port())]
    r = subprocess.run([sys.executable, "-m", "service.cli", *command], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    assert f"kiln {command[0]}: invalid settings: KILN_TASK_TIME_LIMIT_S=20 is below the minimum" in r.stderr

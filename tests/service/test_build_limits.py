"""Build limits follow the model: through the REST API, a JobSpec that leaves max_seq_len / max_input_len
unset builds for a model whose max_position_embeddings is 128 (as `kiln build` does), the job's build
summary shows the limits chosen; explicit values beyond the model stay a 422."""

from __future__ import annotations

import httpx
import pytest

from .conftest import install_in_hf_cache, make_tiny_llama
from .harness import wait_for

SHORT_REPO = "kiln-test/tiny-llama-128"


@pytest.fixture(scope="module")
def short_model(server, tmp_path_factory):
    model = make_tiny_llama(tmp_path_factory.mktemp("short") / "tiny-128", max_position_embeddings=128)
    install_in_hf_cache(model, server["root"] / "storage" / "hf-cache", SHORT_REPO)
    return SHORT_REPO


def test_unset_limits_are_derived_from_the_model_and_shown_in_the_build_summary(server, short_model):
    r = httpx.post(f"{server['http']}/v1/jobs", json={"model": short_model, "build": {"backend": "torch"}})
    limits = _built_limits(server, r)
    assert limits["max_seq_len"] == 128 and limits["max_input_len"] == 128
    assert limits["derived"] == ["max_input_len", "max_seq_len"]
    assert limits["model_max_position_embeddings"] == 128
    # a limit given explicitly is kept, the other derived around it
    r = httpx.post(f"{server['http']}/v1/jobs", json={"model": short_model, "build": {"backend": "torch", "max_seq_len": 96}})
    limits = _built_limits(server, r)
    assert (limits["max_seq_len"], limits["max_input_len"], limits["derived"]) == (96, 96, ["max_input_len"])


def _built_limits(server, r) -> dict:
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    done = wait_for(lambda: (j := httpx.get(f"{server['http']}/v1/jobs/{job_id}").json())["state"]
                    in ("succeeded", "failed", "cancelled") and j, 240, 0.3, "build job")
    assert done["state"] == "succeeded", done["error"]
    build = next(s for s in done["stages"] if s["name"] == "build")
    assert build["summary"]["build_config"]["max_seq_len"] == build["summary"]["limits"]["max_seq_len"]
    return build["summary"]["limits"]


@pytest.mark.parametrize("build, message", [
    ({"max_seq_len": 2048}, "max_seq_len=2048 is beyond the model's max_position_embeddings=128"),
    ({"max_input_len": 512}, "max_input_len=512 is beyond the model's max_position_embeddings=128"),
    ({"max_input_len": 100, "max_seq_len": 64}, "max_input_len=100 exceeds max_seq_len=64"),
])
def test_explicit_limits_beyond_the_model_stay_a_422(server, short_model, build, message):
    r = httpx.post(f"{server['http']}/v1/jobs", json={"model": short_model, "build": {"backend": "torch", **build}})
    assert r.status_code in (400, 422), r.text
    assert message in r.json()["error"]["message"]
    if "beyond" in message:
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_build_config"

"""The service takes jobs for the new dense families (issue 17): a JobSpec naming a Qwen3 / Gemma 2 /
Gemma 3 repo in the Hugging Face cache passes the submit checks (the compiler's preflight at tp 2,
the torch build check, weight-only quantization), and an unknown architecture is refused with the
list that now names them."""

from __future__ import annotations

import json

import pytest
import torch

from service.domain import JobService, JobSpec
from service.store import ArtifactStore, JobStore, make_engine, migrate
from service.workers.pipeline import load_stage_plugins

from .conftest import install_in_hf_cache
from .harness import service_env, settings_from

transformers = pytest.importorskip("transformers")
BUILD = {"backend": "torch", "target": "cpu", "max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64}
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def _models():
    return {
        "kiln-test/tiny-qwen3": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL)),
        "kiln-test/tiny-gemma2": transformers.Gemma2ForCausalLM(transformers.Gemma2Config(sliding_window=8, **SMALL)),
        "kiln-test/tiny-gemma3": transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(sliding_window=8,
                                                                                              **SMALL)),
    }


@pytest.fixture
def service(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = settings_from(service_env(tmp_path / "storage"))
    torch.manual_seed(0)
    for repo, model in _models().items():
        model.save_pretrained(tmp_path / repo, safe_serialization=True)
        install_in_hf_cache(tmp_path / repo, settings.hf_cache, repo)
    bad = tmp_path / "kiln-test" / "tiny-unknown"
    bad.mkdir(parents=True)
    cfg = json.loads((tmp_path / "kiln-test/tiny-qwen3/config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooForCausalLM"]}))
    for f in (tmp_path / "kiln-test/tiny-qwen3").glob("*.safetensors"):
        (bad / f.name).write_bytes(f.read_bytes())
    install_in_hf_cache(bad, settings.hf_cache, "kiln-test/tiny-unknown")
    engine = make_engine(settings.db_url)
    migrate(engine)
    store = JobStore(engine)
    store.upsert_worker("w-cpu", "host", ["cpu"], {"gpus": [], "backends": ["torch"], "unavailable": {}})
    from service.workers.stages import make_submit_validator

    load_stage_plugins(settings)
    yield JobService(store, ArtifactStore(settings.storage_root), enqueue=lambda job_id, queue: None,
                     validate=make_submit_validator(settings))
    engine.dispose()


@pytest.mark.parametrize("repo", ["kiln-test/tiny-qwen3", "kiln-test/tiny-gemma2", "kiln-test/tiny-gemma3"])
def test_new_families_are_accepted_at_submit(service, repo):
    job, created = service.submit("t", JobSpec(model=repo, mapping={"tp_size": 2}))
    assert created and job.state == "queued"
    job, created = service.submit("t", JobSpec(model=repo, quantization={"algo": "W8A16"}, build=BUILD))
    assert created and job.state == "queued"


def test_unknown_architecture_is_refused_with_the_supported_list(service):
    with pytest.raises(Exception) as err:
        service.submit("t", JobSpec(model="kiln-test/tiny-unknown"))
    assert getattr(err.value, "code", None) == "unsupported_architecture"
    hint = str(getattr(err.value, "hint", "")) + str(err.value)
    for arch in ("Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        assert arch in hint

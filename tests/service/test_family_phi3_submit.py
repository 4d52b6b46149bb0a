"""The service takes Phi3ForCausalLM jobs: with the repo in the Hugging Face cache, submit runs the
compiler's preflights (architecture, tp split, quantizer, build) and accepts a W8A16 + torch build job at
tp 2; what the compiler refuses for Phi-3 (calibrated quantization) is refused at submit, nothing written."""

from __future__ import annotations

import pytest

from service.domain import JobSpec
from service.store import JobStore, make_engine, migrate

from .conftest import install_in_hf_cache
from .harness import service_env, settings_from
from .test_compile_stages import BUILD, _service

PHI3_REPO = "kiln-test/tiny-phi3"


@pytest.fixture
def phi3_service(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.Phi3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, original_max_position_embeddings=64, sliding_window=None,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.Phi3ForCausalLM(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = settings_from(service_env(tmp_path / "storage"))
    install_in_hf_cache(tmp_path / "hf", settings.hf_cache, PHI3_REPO)
    engine = make_engine(settings.db_url)
    migrate(engine)
    store = JobStore(engine)
    store.upsert_worker("w-cpu", "host", ["cpu"], {"gpus": [], "backends": ["torch"], "unavailable": {}})
    yield settings, store, _service(settings, store)
    engine.dispose()


def test_phi3_job_is_accepted_and_calibrated_quantization_refused_at_submit(phi3_service):
    settings, store, svc = phi3_service
    job, created = svc.submit("t", JobSpec(model=PHI3_REPO, mapping={"tp_size": 2}, build=BUILD))
    assert created and job.state == "queued"
    job, created = svc.submit("t", JobSpec(model=PHI3_REPO, quantization={"algo": "W8A16"}, build=BUILD))
    assert created and job.state == "queued"
    with pytest.raises(Exception) as err:
        svc.submit("t", JobSpec(model=PHI3_REPO, quantization={"algo": "FP8"}))
    assert getattr(err.value, "code", None) == "unsupported_architecture", err.value
    assert len(store.list(tenant="t")[0]) == 2
    assert not (settings.storage_root / "stages").exists()

"""quantize -> build -> evaluate through a real worker process (embedded transport + SQLite), the
accuracy gate, submit-time refusals of bad combinations, and backend-aware worker matching."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from service.domain import JobService, JobSpec
from service.domain.errors import status_for
from service.store import ArtifactStore, JobStore, make_engine, migrate
from service.workers.broker import make_celery, publish
from service.workers.pipeline import load_stage_plugins

from .conftest import TINY_REPO, install_in_hf_cache
from .harness import service_env, settings_from, start_worker, stop, wait_for

BUILD = {"backend": "torch", "target": "cpu", "max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128}
EVAL = {"max_samples": 4, "seq_len": 64, "max_new_tokens": 8}


def _service(settings, store, enqueue=lambda job_id, queue: None):
    from service.workers.stages import make_submit_validator

    load_stage_plugins(settings)
    return JobService(store, ArtifactStore(settings.storage_root), enqueue=enqueue,
                      validate=make_submit_validator(settings))


@pytest.fixture(scope="module")
def worker_cluster(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("compile")
    env = service_env(root / "storage")
    settings = settings_from(env)
    install_in_hf_cache(tiny_model_dir, settings.hf_cache, TINY_REPO)
    engine = make_engine(settings.db_url)
    migrate(engine)
    store = JobStore(engine)
    celery_app = make_celery(settings)
    svc = _service(settings, store, lambda job_id, queue: publish(celery_app, job_id, queue))
    proc = start_worker(env, root / "w1.log", "w1")
    try:
        wait_for(lambda: store.live_workers(60), 60, what="worker registration")
        yield {"store": store, "service": svc, "settings": settings, "log": root / "w1.log"}
    finally:
        stop(proc)
        engine.dispose()


def _finish(c, job_id, timeout=180):
    job = wait_for(lambda: (j := c["store"].get(job_id)).terminal and j, timeout, 0.2, "job to finish")
    return job


def test_w8a16_build_evaluate_job_succeeds_with_checkpoint_engine_report(worker_cluster):
    c = worker_cluster
    spec = JobSpec(model=TINY_REPO, quantization={"algo": "W8A16"}, build=BUILD, evaluation=EVAL)
    job, _ = c["service"].submit("t", spec)
    done = _finish(c, job.id)
    assert done.state == "succeeded", (done.error, c["log"].read_text()[-3000:])
    assert [s.name for s in done.stages] == ["fetch", "convert", "quantize", "build", "evaluate", "publish"]
    assert [a.name for a in done.artifacts] == ["checkpoint", "engine", "report"]
    stages = {s.name: s for s in done.stages}
    assert stages["quantize"].summary["quant_algo"] == "W8A16"
    timings = stages["quantize"].summary["timings"]  # the part times of the quantize stage
    assert timings["write_s"] > 0 and timings["load_s"] > 0 and timings["total_s"] <= stages["quantize"].summary["seconds"]
    assert stages["build"].summary["weights"] == "quantized"  # the torch engine runs the int8 weights
    assert stages["evaluate"].summary["passed"] is True
    assert stages["evaluate"].summary["engine"]["greedy_identical"] == 1.0

    svc = c["service"]
    ckpt, _ = svc.artifact_file("t", job.id, "checkpoint", "config.json")
    assert json.loads(ckpt.read_text())["quantization"]["quant_algo"] == "W8A16"
    eng, _ = svc.artifact_file("t", job.id, "engine", "config.json")
    assert json.loads(eng.read_text())["backend"] == "torch"
    from service.compiler.checkpoint.safetensors_io import SafetensorsFile

    with SafetensorsFile(eng.parent / "rank0.safetensors") as f:  # the published engine holds int8 weights
        assert str(f.tensor("layers.0.qkv.weight").dtype) == "torch.int8"
    rep_path, _ = svc.artifact_file("t", job.id, "report", "report.json")
    rep = json.loads(rep_path.read_text())
    assert rep["passed"] and rep["accuracy"]["quant_algo"] == "W8A16"
    assert rep["accuracy"]["top1_agreement"] > 0.9 and rep["engine"]["max_abs_logit_error"] < 1e-3
    assert svc.artifact_file("t", job.id, "report", "report.html")[0].read_text().startswith("<!doctype html>")
    served = svc.report("t", job.id)
    assert served["evaluation"]["passed"] is True
    # the build's performance report: stored with the engine, in the build stage's summary and the job report
    perf_path, _ = svc.artifact_file("t", job.id, "engine", "performance.json")
    perf = json.loads(perf_path.read_text())
    for key in ("build_seconds", "load_seconds", "ttft_seconds", "decode_tokens_per_second_batch_1",
                "decode_tokens_per_second_max_batch"):
        assert perf[key] > 0, (key, perf)
    assert perf["max_batch_size"] == 4 and perf["peak_gpu_memory_bytes"] is None and perf["peak_gpu_memory_reason"]
    assert stages["build"].summary["performance"] == perf
    assert next(s for s in served["stages"] if s["name"] == "build")["summary"]["performance"] == perf

    # the same request again: every stage is a cache hit, the same artifacts come back
    again, created = svc.submit("t", spec)
    assert created
    done2 = _finish(c, again.id)
    assert done2.state == "succeeded"
    assert all(s.cache_hit for s in done2.stages if s.name in ("convert", "quantize", "build", "evaluate"))
    assert [a.key for a in done2.artifacts] == [a.key for a in done.artifacts]


def test_impossible_threshold_fails_the_job_with_the_report_attached(worker_cluster):
    c = worker_cluster
    spec = JobSpec(model=TINY_REPO, quantization={"algo": "int8_weight_only",  # the old name, an alias of W8A16
                                                  "thresholds": {"min_top1_agreement": 1.0, "max_kl_divergence": 0.0}},
                   build=BUILD, evaluation=EVAL)
    job, _ = c["service"].submit("t", spec)
    done = _finish(c, job.id)
    assert done.state == "failed", c["log"].read_text()[-3000:]
    assert done.error.code == "accuracy_below_threshold"
    assert "KL" in done.error.message
    assert [a.name for a in done.artifacts] == ["report"]  # engine and checkpoint are not published as good
    assert {s.name: s.state for s in done.stages}["evaluate"] == "done"
    served = c["service"].report("t", job.id)
    assert served["state"] == "failed" and served["evaluation"]["passed"] is False
    assert any("KL" in f for f in served["evaluation"]["failures"])
    assert status_for("accuracy_below_threshold")[0] == 422


# -- submit-time refusals: nothing written --------------------------------------------------------

@pytest.fixture
def local(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = service_env(tmp_path / "storage")
    settings = settings_from(env)
    install_in_hf_cache(tiny_model_dir, settings.hf_cache, TINY_REPO)
    engine = make_engine(settings.db_url)
    migrate(engine)
    store = JobStore(engine)
    store.upsert_worker("w-cpu", "host", ["cpu"], {"gpus": [], "backends": ["torch"],
                                                  "unavailable": {"onnx": "no onnx backend module"}})
    yield settings, store, _service(settings, store)
    engine.dispose()


SPEC_ERRORS = {  # refused by JobSpec itself (400 on REST, INVALID_ARGUMENT on gRPC)
    "unknown algo": {"quantization": {"algo": "INT3"}},
    "unknown kv cache": {"quantization": {"kv_cache": "int4"}},
    "fp8 on an sm80 target": {"quantization": {"algo": "FP8"}, "build": {**BUILD, "target": "sm80"}},
    "fp8 kv cache on an sm86 target": {"quantization": {"algo": "W8A16", "kv_cache": "FP8"},
                                       "build": {**BUILD, "target": "sm86"}},
    "quantization with tp 2": {"quantization": {"algo": "W8A16"}, "mapping": {"tp_size": 2}},
    "zero point without awq": {"quantization": {"algo": "W4A16", "has_zero_point": True}},
    "calibration from an unknown dataset": {"quantization": {"algo": "FP8", "calibration": {"dataset": "mine"}}},
    "evaluation of nothing": {"evaluation": EVAL},
    "calibration method for a non-FP8 algo": {"quantization": {"algo": "W8A16", "calibration_method": "max"}},
    "unknown calibration method": {"quantization": {"algo": "FP8", "calibration_method": "fast"}},
}

SUBMIT_ERRORS = {  # refused at submit by the compiler's checks: (spec, code)
    "group_size not dividing features": ({"quantization": {"algo": "W4A16_AWQ", "group_size": 48}}, "invalid_argument"),
    "smoothquant engine the backend cannot build": ({"quantization": {"algo": "W8A8_SQ_PER_CHANNEL"}, "build": BUILD},
                                                    "invalid_argument"),
    "kv cache the engine cannot run": ({"quantization": {"algo": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
                                                         "kv_cache": "INT8"}, "build": BUILD}, "invalid_argument"),
    "max_seq_len beyond the model": ({"build": {**BUILD, "max_seq_len": 4096}}, "invalid_build_config"),
    "unknown target arch": ({"build": {**BUILD, "target": "sm120"}}, "invalid_build_config"),
    "backend no worker has": ({"build": {**BUILD, "backend": "onnx"}}, "no_worker"),
    "target no worker serves": ({"build": {**BUILD, "target": "sm90"}}, "no_worker"),
}


@pytest.mark.parametrize("case", list(SPEC_ERRORS))
def test_bad_combinations_are_refused_by_the_spec(case):
    with pytest.raises(ValidationError):
        JobSpec(model=TINY_REPO, **SPEC_ERRORS[case])


@pytest.mark.parametrize("case", list(SUBMIT_ERRORS))
def test_bad_combinations_are_refused_at_submit_and_nothing_is_written(local, case):
    settings, store, svc = local
    body, code = SUBMIT_ERRORS[case]
    with pytest.raises(Exception) as err:
        svc.submit("t", JobSpec(model=TINY_REPO, **body))
    assert getattr(err.value, "code", None) == code, err.value
    assert 400 <= status_for(code)[0] < 500
    assert store.list(tenant="t")[0] == []
    assert not (settings.storage_root / "stages").exists()


def test_every_quantizer_algo_is_accepted_at_submit(local):
    """The JobSpec names and the quantizer agree: each algo the spec lists passes the compiler's checks."""
    _, store, svc = local
    for algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A16", "W4A16", "W8A8_SQ_PER_CHANNEL",
                 "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"):
        job, created = svc.submit("t", JobSpec(model=TINY_REPO, quantization={"algo": algo}))
        assert created and job.state == "queued", algo


def test_fp8_calibration_method_reaches_the_quantizer_and_the_stage_key():
    import service.workers.stages  # noqa: F401  (registers convert, which the quantize stage follows)
    from service.workers.compile_stages import _quant_config, quantize_config

    default = quantize_config(JobSpec(model=TINY_REPO, quantization={"algo": "FP8"}))
    gptq = quantize_config(JobSpec(model=TINY_REPO, quantization={"algo": "FP8", "calibration_method": "gptq"}))
    fast = quantize_config(JobSpec(model=TINY_REPO, quantization={"algo": "FP8", "calibration_method": "max"}))
    assert default == gptq and default["fp8_weight_rounding"] == "gptq"  # the keys cached before stay valid
    assert fast != default and fast["fp8_weight_rounding"] == "max"
    assert _quant_config(default).fp8_gptq and not _quant_config(fast).fp8_gptq
    assert "fp8_weight_rounding" not in quantize_config(JobSpec(model=TINY_REPO, quantization={"algo": "W8A16"}))


def test_trtllm_names_and_old_aliases_normalize_to_one_spec():
    a = JobSpec(model=TINY_REPO, quantization={"algo": "w4a16_awq", "kv_cache": "int8"})
    b = JobSpec(model=TINY_REPO, quantization={"algo": "W4A16_AWQ", "kv_cache": "INT8"})
    assert a.quantization.algo == "W4A16_AWQ" and a.quantization.kv_cache == "INT8"
    assert a.digest() == b.digest()
    assert JobSpec(model=TINY_REPO, quantization={"algo": "smoothquant"}).quantization.algo == "W8A8_SQ_PER_CHANNEL"


def test_worker_advertises_only_backends_that_build_here():
    import importlib.util

    from service.workers.runtime import detect_capabilities

    caps = detect_capabilities()
    assert "torch" in caps["backends"]
    for name, module in (("tensorrt", "tensorrt"), ("trtllm", "tensorrt_llm")):
        if importlib.util.find_spec(module) is None or not caps["gpus"]:
            assert name not in caps["backends"] and caps["unavailable"][name]
    for name in caps["backends"]:
        assert importlib.util.find_spec(f"service.compiler.build.backends.{name}_backend") is not None


def test_pp_split_balanced_maps_to_the_cost_balanced_mapping(tmp_path):
    """JobSpec mapping.pp_split picks the compiler's split; 'even' stays TensorRT-LLM's."""
    import json

    from service.workers.stages import job_mapping

    # a heterogeneous DeciLM-style config: the second half of the layers are no-op/linear, so
    # balancing moves layers to the second stage
    blocks = [{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 2.0}}] * 4 + \
             [{"attention": {"no_op": True}, "ffn": {"replace_with_linear": True}}] * 4
    cfg = {"architectures": ["DeciLMForCausalLM"], "hidden_size": 256, "num_hidden_layers": 8,
           "num_attention_heads": 4, "intermediate_size": 512, "vocab_size": 64, "block_configs": blocks,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu", "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    even = job_mapping(1, 2, "even", tmp_path)
    balanced = job_mapping(1, 2, "balanced", tmp_path)
    assert even.layers_per_stage is None
    assert balanced.layers_per_stage is not None and balanced.layers_per_stage[0] < 4
    assert JobSpec(model=TINY_REPO, mapping={"pp_size": 2, "pp_split": "balanced"}).mapping.pp_split == "balanced"

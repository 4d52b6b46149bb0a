"""torch-backend engines on CPU: build from tiny converted checkpoints, generate, compare.

The oracles are the reference runtime (service.compiler.reference.ReferenceModel, when importable)
and transformers itself; generations must be identical token for token (float32, greedy).
"""

from __future__ import annotations

import json

import pytest
import torch

from service.compiler import convert_checkpoint
from service.compiler.build import (
    BackendUnavailable,
    BuildConfig,
    EngineDoesNotFit,
    InvalidBuildConfig,
    TargetUnavailable,
    UnknownBackend,
    build,
    plan_build,
)
from service.compiler.build.config import GpuTarget, validate_build
from service.compiler.checkpoint.validate import load_config
from service.compiler.engine.engine import Engine, SamplingConfig

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 88, 41, 9, 2], [60, 1, 33], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 12], [96]]

ARCHS = {
    "llama-gqa-llama3rope": lambda: transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    "llama-tied-mha": lambda: transformers.LlamaConfig(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
        vocab_size=97, max_position_embeddings=96, tie_word_embeddings=True, rope_theta=500000.0),
    "qwen2-bias": lambda: transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=103, max_position_embeddings=128, use_sliding_window=False),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=101, max_position_embeddings=128, sliding_window=None),
}
HF_CLASSES = {"llama-gqa-llama3rope": "LlamaForCausalLM", "llama-tied-mha": "LlamaForCausalLM",
              "qwen2-bias": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[name])(ARCHS[name]())
    if name == "qwen2-bias":  # default init leaves biases at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def built(request, tmp_path_factory):
    name = request.param
    model = _hf_model(name)
    root = tmp_path_factory.mktemp(name)
    model.save_pretrained(root / "hf", safe_serialization=True)
    convert_checkpoint(root / "hf", root / "ckpt", dtype="float32")
    stats = build(root / "ckpt", BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64, target="cpu"),
                  root / "engine")
    return name, model, root, stats


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_engine_dir_has_trtllm_shaped_config(built):
    _, _, root, stats = built
    cfg = json.loads((root / "engine" / "config.json").read_text())
    assert {"version", "pretrained_config", "build_config"} <= set(cfg)
    assert cfg["build_config"]["max_batch_size"] == 4 and cfg["build_config"]["max_seq_len"] == 64
    assert cfg["pretrained_config"]["architecture"] == load_config(root / "ckpt")["architecture"]
    assert (root / "engine" / "rank0.safetensors").is_file()
    assert cfg["engine"]["arch"] == "cpu" and cfg["engine"]["compile_cache"] is None
    assert stats["weights_bytes"] > 0


def test_build_writes_a_performance_report(built):
    """performance.json: build / load time, TTFT, decode tok/s at batch 1 and max_batch_size, timed
    after the engine is complete; peak GPU memory is null on the CPU, with the reason."""
    _, _, root, stats = built
    perf = json.loads((root / "engine" / "performance.json").read_text())
    from service.compiler.engine.performance import KEYS

    assert set(KEYS) <= set(perf) and perf["build_seconds"] == stats["build_seconds"]
    for key in KEYS[:-1]:
        assert isinstance(perf[key], (int, float)) and perf[key] > 0, (key, perf)
    assert perf["ttft_seconds"] < 60 and perf["max_batch_size"] == 4 and perf["prompt_tokens"] == 16
    assert perf["new_tokens"] == {"batch_1": 16, "max_batch": 16} and perf["device"] == "cpu"
    assert perf["peak_gpu_memory_bytes"] is None and "CPU" in perf["peak_gpu_memory_reason"]


def test_build_without_performance_measurement(tiny_ckpt, tmp_path):
    """measure_performance=False: performance.json still exists, every figure null, with the reason."""
    from service.compiler.engine.performance import KEYS

    build(tiny_ckpt, BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=32, target="cpu",
                                 measure_performance=False), tmp_path / "engine")
    perf = json.loads((tmp_path / "engine" / "performance.json").read_text())
    assert all(perf[k] is None for k in KEYS if k != "build_seconds") and "measure_performance" in perf["reason"]
    assert perf["build_seconds"] > 0
    assert Engine.load(tmp_path / "engine").generate([[1, 2, 3]], 4).tokens[0]
    with pytest.raises(InvalidBuildConfig, match="measure_performance must be true or false"):
        build(tiny_ckpt, BuildConfig(target="cpu", measure_performance="false"), tmp_path / "e2")
    assert not (tmp_path / "e2").exists()


def test_batched_greedy_generation_matches_transformers(built):
    _, model, root, _ = built
    engine = Engine.load(root / "engine")
    out = engine.generate(PROMPTS, max_new_tokens=12)
    assert out.tokens == [_hf_greedy(model, p, 12) for p in PROMPTS]


def test_more_prompts_than_max_batch_are_chunked(built):
    _, model, root, _ = built
    engine = Engine.load(root / "engine")
    prompts = PROMPTS + [[3, 4], [8, 9, 10, 11, 12]]  # 6 prompts, max_batch_size 4
    out = engine.generate(prompts, max_new_tokens=5)
    assert out.stats["batches"] == 2
    assert out.tokens == [_hf_greedy(model, p, 5) for p in prompts]


def test_forward_logits_match_transformers(built):
    _, model, root, _ = built
    engine = Engine.load(root / "engine")
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    with torch.no_grad():
        ref = model(ids).logits.float()
    torch.testing.assert_close(engine.forward(ids), ref, rtol=1e-4, atol=1e-4)


def test_generation_matches_reference_runtime(built):
    runtime = pytest.importorskip("service.compiler.reference", reason="reference runtime not importable")
    _, _, root, _ = built
    ref = runtime.ReferenceModel.from_checkpoint(root / "ckpt")
    engine = Engine.load(root / "engine")
    for p in PROMPTS:
        assert engine.generate([p], max_new_tokens=10).tokens[0] == ref.generate(p, max_new_tokens=10)
    torch.testing.assert_close(engine.forward([PROMPTS[0]]), ref.forward([PROMPTS[0]]), rtol=1e-4, atol=1e-4)
    engine.close()  # releases captured graphs (none on the CPU); the engine still generates after it
    assert not engine._graphs
    assert engine.generate([PROMPTS[0]], max_new_tokens=10).tokens[0] == ref.generate(PROMPTS[0], max_new_tokens=10)


def test_sampling_is_seeded_and_eos_stops(built):
    _, _, root, _ = built
    engine = Engine.load(root / "engine")
    s = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, seed=123)
    a = engine.generate(PROMPTS[:2], 20, s).tokens
    assert a == engine.generate(PROMPTS[:2], 20, s).tokens
    greedy = engine.generate([PROMPTS[0]], 20).tokens[0]
    eos = greedy[3]
    stopped = engine.generate([PROMPTS[0]], 20, SamplingConfig(eos_token_id=eos)).tokens[0]
    assert stopped == greedy[: greedy.index(eos) + 1]


def test_prompt_beyond_limits_is_refused(built):
    _, _, root, _ = built
    engine = Engine.load(root / "engine")
    with pytest.raises(Exception, match="max_input_len"):
        engine.generate([[1] * 33], 4)
    with pytest.raises(Exception, match="max_seq_len"):
        engine.generate([[1] * 30], 40)


# -- bad build configs fail fast, before any tensor is read ------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model = _hf_model("llama-gqa-llama3rope")
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(root / "hf", safe_serialization=True)
    convert_checkpoint(root / "hf", root / "ckpt", dtype="float32")
    return root / "ckpt"


def test_performance_measurement_failure_names_the_rank(tiny_ckpt, tmp_path):
    """A tp engine is timed by one process per rank; a rank that cannot load fails the measurement
    (and so the build) with its error, and the other rank does not hang."""
    from service.compiler.engine.performance import measure_in_build

    build(tiny_ckpt, BuildConfig(max_batch_size=1, max_input_len=8, max_seq_len=16, target="cpu"), tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    cfg["engine"]["tp_size"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # and no weights
    with pytest.raises(RuntimeError, match=r"(?s)rank 0 \(exit -?\d+\).*No such file.*rank0\.safetensors"):
        measure_in_build(tmp_path, gpu=False, tp=2, timeout_s=300)


def test_max_seq_len_beyond_the_model_is_refused(tiny_ckpt, tmp_path):
    with pytest.raises(InvalidBuildConfig, match="max_position_embeddings=128"):
        build(tiny_ckpt, BuildConfig(max_seq_len=4096, target="cpu"), tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_kiln_build_and_generate_commands(tiny_ckpt, tmp_path, capsys):
    """`kiln build` writes the engine (summary with its performance report); `kiln generate` runs it
    (token ids or, with a tokenizer, text); a bad build config is refused with a clear error and
    nothing is written."""
    from service.cli import main as kiln

    out = tmp_path / "engine"
    limits = ["--target", "cpu", "--max-batch-size", "2", "--max-input-len", "16", "--max-seq-len", "48"]
    assert kiln(["build", str(tiny_ckpt), str(out), *limits, "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["engine_dir"] == str(out) and summary["arch"] == "cpu" and summary["tp_size"] == 1
    assert summary["weights_bytes"] > 0 and summary["performance"]["decode_tokens_per_second_batch_1"] > 0
    assert json.loads((out / "config.json").read_text())["build_config"]["max_seq_len"] == 48

    ids = ",".join(map(str, PROMPTS[0]))
    assert kiln(["generate", str(out), "--ids", ids, "--max-new-tokens", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["tokens"] == Engine.load(out).generate([PROMPTS[0]], 6).tokens[0] and got["device"] == "cpu"
    assert kiln(["generate", str(out), "--ids", ids, "--max-new-tokens", "6", "--temperature", "0.9",
                 "--seed", "3"]) == 0
    sampled = capsys.readouterr().out.strip().splitlines()[-1]
    want = Engine.load(out).generate([PROMPTS[0]], 6, SamplingConfig(temperature=0.9, seed=3)).tokens[0]
    assert sampled == ",".join(map(str, want))

    assert kiln(["generate", str(out), "--prompt", "hello"]) == 2  # no tokenizer shipped with this model
    assert "text prompts need a tokenizer" in capsys.readouterr().err
    tokenizers = pytest.importorskip("tokenizers")  # a word-level tokenizer over the model's 101 ids
    word = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(101)}, unk_token="w0"))
    word.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=word, unk_token="w0").save_pretrained(tmp_path / "tok")
    text = " ".join(f"w{i}" for i in PROMPTS[0])
    assert kiln(["generate", str(out), "--prompt", text, "--tokenizer", str(tmp_path / "tok"),
                 "--max-new-tokens", "6", "--json"]) == 0
    got_text = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got_text["tokens"] == got["tokens"] and got_text["text"].split() == [f"w{i}" for i in got["tokens"]]
    assert kiln(["generate", str(out), "--prompt", text, "--tokenizer", str(tmp_path)]) == 2
    assert "no tokenizer could be loaded" in capsys.readouterr().err
    assert kiln(["generate", str(out), "--ids", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert kiln(["generate", str(tmp_path / "missing"), "--ids", "1"]) == 2
    assert "error [invalid_argument]: no such directory" in capsys.readouterr().err

    bad = tmp_path / "bad"
    assert kiln(["build", str(tiny_ckpt), str(bad), "--target", "cpu", "--max-seq-len", "4096", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error [invalid_build_config]" in err and "max_position_embeddings=128" in err
    assert not bad.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["engine", "tok"]  # no temp dir left
    assert kiln(["build", str(tiny_ckpt), str(out), *limits, "--quiet"]) == 2  # exists: needs --overwrite
    assert "already exists" in capsys.readouterr().err


def test_unknown_backend_is_refused(tiny_ckpt, tmp_path):
    with pytest.raises(UnknownBackend):
        build(tiny_ckpt, BuildConfig(backend="tvm", target="cpu"), tmp_path / "e")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_target_gpu_absent_is_refused(tiny_ckpt, tmp_path):
    with pytest.raises(TargetUnavailable, match="sm90"):
        build(tiny_ckpt, BuildConfig(target="h100"), tmp_path / "e")


def test_tensorrt_backend_not_installed_is_refused_with_reason(tiny_ckpt, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt imports here; the refusal path is for machines without it")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailable, match="import tensorrt"):
        build(tiny_ckpt, BuildConfig(backend="tensorrt", target="h100"), tmp_path / "e")


def test_batch_that_does_not_fit_the_memory_estimate_is_refused():
    # an 8B-shaped config on a (nominal) 24 GiB L4: weights 16 GB + KV for 64 x 8192 tokens
    cfg = {"architecture": "LlamaForCausalLM", "dtype": "bfloat16", "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_size": 128, "intermediate_size": 14336,
           "vocab_size": 128256, "max_position_embeddings": 131072}
    l4 = GpuTarget("l4", 89, 24 << 30)
    with pytest.raises(EngineDoesNotFit, match=r"KV cache 68\.72 GB"):
        validate_build(BuildConfig(max_batch_size=64, max_seq_len=8192, target="l4"), cfg, machine_gpus=[l4])
    ok = validate_build(BuildConfig(max_batch_size=1, max_seq_len=2048, target="l4"), cfg, machine_gpus=[l4])
    assert 16.0e9 < ok.estimate.weights_bytes < 16.1e9 and ok.estimate.fits
    h100 = GpuTarget("NVIDIA H100 80GB HBM3", 90, 81559 << 20)
    big = validate_build(BuildConfig(max_batch_size=32, max_seq_len=2048, target="h100"), cfg, machine_gpus=[h100])
    assert big.arch_tag == "sm90" and big.estimate.kv_cache_bytes == 32 * 2048 * 128 * 1024


def test_plan_build_uses_exact_weight_bytes(tiny_ckpt):
    plan = plan_build(tiny_ckpt, BuildConfig(target="cpu", max_seq_len=64, max_input_len=32))
    from service.compiler.checkpoint.safetensors_io import read_header

    infos, _ = read_header(tiny_ckpt / "rank0.safetensors")
    assert plan.estimate.weights_bytes == sum(i.nbytes for i in infos.values())
    assert plan.config.max_num_tokens == 8 * 32 and plan.config.dtype == "float32"


def test_paged_kv_and_non_llama_are_refused_by_torch_backend(tiny_ckpt):
    cfg = load_config(tiny_ckpt)
    with pytest.raises(InvalidBuildConfig, match="continuous"):
        validate_build(BuildConfig(kv_cache_type="paged", target="cpu"), cfg, machine_gpus=[])
    with pytest.raises(InvalidBuildConfig, match="Llama family"):
        validate_build(BuildConfig(target="cpu"), {**cfg, "architecture": "BloomForCausalLM"}, machine_gpus=[])


def test_tp2_checkpoint_builds_a_merged_engine(tmp_path):
    pytest.importorskip("service.compiler.reference", reason="merging ranks needs the reference runtime's loader")
    from service.compiler import Mapping

    model = _hf_model("llama-gqa-llama3rope", seed=1)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", mapping=Mapping(tp_size=2, pp_size=1))
    build(tmp_path / "ckpt", BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=48, target="cpu"),
          tmp_path / "engine")
    out = Engine.load(tmp_path / "engine").generate(PROMPTS[:2], max_new_tokens=8)
    assert out.tokens == [_hf_greedy(model, p, 8) for p in PROMPTS[:2]]


def test_capabilities_advertise_only_backends_that_import_and_have_a_builder(tiny_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    from service.compiler.build.capabilities import capabilities

    caps = capabilities().to_dict()
    by_name = {b["name"]: b for b in caps["backends"]}
    assert by_name["torch"]["available"] and by_name["onnx"]["available"]  # onnx + onnxruntime import here
    for name in ("tensorrt", "trtllm"):
        if not by_name[name]["available"]:
            assert by_name[name]["reason"]
            with pytest.raises(BackendUnavailable, match=name):
                build(tiny_ckpt, BuildConfig(backend=name, target="cpu"), tmp_path / name)
    assert ("build.cpu" in caps["build_queues"]) and all(q.startswith("build.") for q in caps["build_queues"])


def test_onnx_engine_matches_reference_and_transformers(built, tmp_path):
    """Prefill and decode graphs with KV-cache I/O, external data, run by onnxruntime on the CPU."""
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    _, model, root, _ = built
    build(root / "ckpt", BuildConfig(backend="onnx", max_batch_size=2, max_input_len=32, max_seq_len=64,
                                     target="cpu"), tmp_path / "onnx")
    cfg = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert cfg["backend"] == "onnx" and cfg["verification"]["greedy_identical"]
    assert cfg["verification"]["max_abs_logit_error"] < 1e-4
    perf = json.loads((tmp_path / "onnx" / "performance.json").read_text())
    assert perf["backend"] == "onnx" and perf["max_batch_size"] == 2 and perf["peak_gpu_memory_bytes"] is None
    assert all(perf[k] > 0 for k in ("build_seconds", "load_seconds", "ttft_seconds",
                                     "decode_tokens_per_second_batch_1", "decode_tokens_per_second_max_batch"))
    assert (tmp_path / "onnx" / "prefill.onnx.data").stat().st_size > (tmp_path / "onnx" / "prefill.onnx").stat().st_size
    # a batch of two through both graphs against transformers
    prefill = ort.InferenceSession(str(tmp_path / "onnx" / "prefill.onnx"), providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(tmp_path / "onnx" / "decode.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([PROMPTS[0], PROMPTS[0][::-1]], dtype=np.int64)
    logits, keys, values = prefill.run(None, {"input_ids": ids})
    nxt = logits[:, -1].argmax(-1)
    step, _, _ = decode.run(None, {"input_ids": nxt[:, None].astype(np.int64), "past_keys": keys,
                                   "past_values": values})
    with torch.no_grad():
        ref = model(torch.cat([torch.tensor(ids), torch.tensor(nxt)[:, None]], 1)).logits.float().numpy()
    np.testing.assert_allclose(logits, ref[:, :-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(step[:, 0], ref[:, -1], rtol=1e-4, atol=1e-4)

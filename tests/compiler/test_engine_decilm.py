"""Nemotron-NAS / DeciLM on the torch engine (CPU): heterogeneous layers against the DeciLM reference.

The tiny synthetic model of test_nemotron_nas.py (every attention {attention, linear, no_op} x ffn
{mlp, linear, no_op} block, KV heads 8/4/1/2) is converted, built with the torch backend and run by
``Engine``: greedy tokens must equal the reference runtime's, logits agree to float32 tolerance,
and only the attention layers hold a KV cache (each with its own KV heads), in memory and in the
build's memory estimate.
"""

from __future__ import annotations

import json

import pytest
import torch

from service.compiler import Mapping, convert_checkpoint
from service.compiler.build import BuildConfig, InvalidBuildConfig, build, plan_build
from service.compiler.build.config import validate_build
from service.compiler.checkpoint.validate import load_config
from service.compiler.engine.engine import Engine
from service.compiler.reference import ReferenceModel
from tests.compiler.test_nemotron_nas import IDS, D, tiny  # noqa: F401  (tiny: the fixture)

PROMPTS = [[3, 17, 42, 5, 88, 60, 1], [29, 71, 13], [9, 50, 50, 2, 64, 33, 7, 70, 11, 4, 96], [8]]
LIMITS = dict(max_batch_size=2, max_input_len=16, max_seq_len=40, target="cpu")
CACHE_LAYERS, CACHE_KV = [0, 3, 6, 9], [8, 4, 1, 2]  # the attention layers of BLOCKS and their KV heads


@pytest.fixture(scope="module")
def engines(tiny, tmp_path_factory):  # noqa: F811  (the imported fixture)
    src, *_ = tiny
    root = tmp_path_factory.mktemp("decilm-engine")
    convert_checkpoint(src, root / "ckpt", dtype="float32")
    build(root / "ckpt", BuildConfig(**LIMITS), root / "engine")
    convert_checkpoint(src, root / "ckpt-tp2pp2", dtype="float32", mapping=Mapping(tp_size=2, pp_size=2))
    build(root / "ckpt-tp2pp2", BuildConfig(**LIMITS), root / "engine-tp2pp2")
    return root, ReferenceModel.from_checkpoint(root / "ckpt")


def _reference_generate(ref: ReferenceModel, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with the reference runtime's KV cache (what ReferenceModel.generate runs)."""
    cache = ref.new_cache()
    logits, out = ref.forward(torch.tensor([prompt]), cache), []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = ref.forward(torch.tensor([[out[-1]]]), cache)
    return out


def test_engine_directory_is_a_decilm_engine(engines):
    root, _ = engines
    cfg = json.loads((root / "engine" / "config.json").read_text())
    assert cfg["engine"]["layout"] == "kiln-decilm-fused/1" and cfg["engine"]["tp_size"] == 1
    assert cfg["pretrained_config"]["architecture"] == "DeciLMForCausalLM"
    from safetensors import safe_open

    with safe_open(str(root / "engine" / "rank0.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"layers.0.qkv", "layers.1.attn_linear", "layers.3.ffn_linear", "layers.0.gate_up"} <= names
    assert not [n for n in names if n.startswith("layers.8.")]  # no_op + no_op: nothing at all
    assert "layers.2.attn_norm" not in names and "layers.6.mlp_norm" not in names  # no-op parts: no norm


def test_kv_cache_only_for_attention_layers_with_their_own_kv_heads(engines):
    root, _ = engines
    model = Engine.load(root / "engine").model
    assert model.cache_layers == CACHE_LAYERS
    assert [k.shape for k in model.k_cache] == [(2, kv, 40, D) for kv in CACHE_KV]
    assert [v.shape for v in model.v_cache] == [(2, kv, 40, D) for kv in CACHE_KV]
    assert model.kv_cache_bytes() == 2 * 2 * 40 * sum(CACHE_KV) * D * 4


@pytest.mark.parametrize("engine_dir", ["engine", "engine-tp2pp2"])
def test_greedy_generation_identical_to_reference_batch_1_and_2(engines, engine_dir):
    root, ref = engines
    engine = Engine.load(root / engine_dir)
    want = [_reference_generate(ref, p, 12) for p in PROMPTS]
    for p, w in zip(PROMPTS, want, strict=True):
        assert engine.generate([p], max_new_tokens=12).tokens[0] == w
    out = engine.generate(PROMPTS, max_new_tokens=12)  # batches of two (max_batch_size 2), right-padded
    assert out.stats["batches"] == 2 and out.tokens == want


def test_shared_reference_model_generate_agrees(engines):
    runtime = pytest.importorskip("service.compiler.reference")
    root, _ = engines
    ref = runtime.ReferenceModel.from_checkpoint(root / "ckpt")
    engine = Engine.load(root / "engine")
    for p in PROMPTS[:2]:
        assert engine.generate([p], max_new_tokens=8).tokens[0] == ref.generate(p, max_new_tokens=8)


def test_prefill_and_decode_logits_match_reference(engines):
    root, ref = engines
    engine = Engine.load(root / "engine")
    ids = torch.stack([IDS, IDS.flip(0)])  # a batch of two, 12 tokens each
    want = ref.forward(ids)
    torch.testing.assert_close(engine.forward(ids), want, rtol=1e-4, atol=1e-4)
    # prefill 5 tokens, then decode the rest one by one through the static caches
    model = engine.model
    with torch.inference_mode():
        got = [model.prefill(ids[:, :5], torch.tensor([5, 5]), all_logits=True)]
        for t in range(5, ids.shape[1]):
            got.append(model.decode(ids[:, t], torch.tensor([t, t]), 16)[:, None])
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-4, atol=1e-4)


# -- the build's memory estimate counts only layers with a KV cache ------------------------------

def _with_layers(cfg: dict, attention: list[tuple[str, int | None]]) -> dict:
    layers = json.loads(json.dumps(cfg["layer_configs"]))
    for entry, (impl, kv) in zip(layers, attention, strict=True):
        entry["attention"] = {"impl": impl, "num_key_value_heads": kv}
    return {**cfg, "layer_configs": layers}


def test_memory_estimate_kv_cache_counts_only_cache_layers(engines):
    root, _ = engines
    cfg = load_config(root / "ckpt")
    bc = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=128, target="cpu", dtype="bfloat16")
    tokens = 4 * 128
    est = validate_build(bc, cfg, machine_gpus=[]).estimate
    assert est.kv_cache_bytes == 2 * sum(CACHE_KV) * D * 2 * tokens  # bf16, 4 cache layers
    # the same model with every layer a full attention layer (8 KV heads, as layer 0)
    full = validate_build(bc, _with_layers(cfg, [("attention", 8)] * 10), machine_gpus=[]).estimate
    assert full.kv_cache_bytes == 2 * 10 * 8 * D * 2 * tokens
    assert est.kv_cache_bytes * 80 == full.kv_cache_bytes * sum(CACHE_KV)  # proportional to the cache heads
    # same KV heads everywhere: the estimate scales with the number of cache layers (4 of 10)
    same = [("attention", 2) if i in CACHE_LAYERS else (b["attention"]["impl"], None)
            for i, b in enumerate(cfg["layer_configs"])]
    every = validate_build(bc, _with_layers(cfg, [("attention", 2)] * 10), machine_gpus=[]).estimate
    assert validate_build(bc, _with_layers(cfg, same), machine_gpus=[]).estimate.kv_cache_bytes * 10 \
        == every.kv_cache_bytes * 4
    # the weight estimate prices only the parts that exist: it equals the checkpoint's bytes
    assert plan_build(root / "ckpt", BuildConfig(**LIMITS)).estimate.weights_bytes == \
        validate_build(BuildConfig(**LIMITS), cfg, machine_gpus=[]).estimate.weights_bytes


def test_decilm_is_refused_where_it_cannot_run(engines):
    root, _ = engines
    cfg = load_config(root / "ckpt-tp2pp2")
    with pytest.raises(InvalidBuildConfig, match="Llama family"):
        validate_build(BuildConfig(backend="onnx", target="cpu"), cfg, machine_gpus=[])
    with pytest.raises(InvalidBuildConfig, match="keep_tensor_parallel"):
        validate_build(BuildConfig(keep_tensor_parallel=True, **LIMITS), cfg, machine_gpus=[])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_gpu_engine_compiled_with_cuda_graphs_matches_reference(engines, tmp_path):
    """The GPU build compiles the per-kind step functions into the shipped cache; decode replays
    one CUDA graph per batch bucket over the attention layers' caches."""
    root, ref = engines
    gpu = dict(LIMITS, target="auto")
    stats = build(root / "ckpt", BuildConfig(**gpu), tmp_path / "engine")
    assert stats["compile_seconds"] > 0
    engine = Engine.load(tmp_path / "engine")
    assert engine.use_graphs and engine.device.type == "cuda" and engine.load_stats["compile_cache"]
    assert [k.shape[1] for k in engine.model.k_cache] == CACHE_KV
    want = [_reference_generate(ref, p, 12) for p in PROMPTS]
    assert engine.generate([PROMPTS[0]], max_new_tokens=12).tokens[0] == want[0]
    assert engine.generate(PROMPTS, max_new_tokens=12).tokens == want
    ids = torch.stack([IDS, IDS.flip(0)])
    torch.testing.assert_close(engine.forward(ids), ref.forward(ids), rtol=2e-3, atol=2e-3)

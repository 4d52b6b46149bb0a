"""Real-size shapes without real weights: a Llama-3.1-70B-shaped model built on the meta device,
planned at tp=8 x pp=2. The plan (from HF shapes and split rules) must equal the spec (from the
checkpoint config alone) on every rank, and no tensor memory is allocated."""

from __future__ import annotations

import pytest
import torch

from service.compiler import Mapping
from service.compiler.models import spec_for_hf
from service.compiler.sources.weights import MetaSource

transformers = pytest.importorskip("transformers")

LLAMA_31_70B = dict(
    architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
    num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)


@pytest.fixture(scope="module")
def meta_plans():
    hf = dict(LLAMA_31_70B)
    cfg_obj = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg_obj)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())
    spec = spec_for_hf(hf)
    mapping = Mapping(tp_size=8, pp_size=2)
    cfg = spec.trt_config(hf, "bfloat16", mapping)
    spec.check_mapping(cfg, mapping)
    source = MetaSource(shapes)
    return spec, cfg, {rank: spec.plan(cfg, rank, source) for rank in range(16)}


def test_70b_tp8_pp2_every_rank_matches_spec(meta_plans):
    spec, cfg, plans = meta_plans
    for rank, plan in plans.items():
        expected = [(n, tuple(s)) for n, s, _ in spec.expected(cfg, rank)]
        assert [(p.name, p.shape) for p in plan] == expected
        assert all(p.dtype == torch.bfloat16 for p in plan)


def test_70b_tp8_pp2_names_and_shapes(meta_plans):
    _, cfg, plans = meta_plans
    r0 = {p.name: p.shape for p in plans[0]}  # pp stage 0, tp rank 0
    r15 = {p.name: p.shape for p in plans[15]}  # pp stage 1, tp rank 7
    assert r0["transformer.vocab_embedding.weight"] == (128256, 8192)
    assert "lm_head.weight" not in r0 and "transformer.ln_f.weight" not in r0
    # 64 q heads / 8 = 8 per rank, 8 kv heads / 8 = 1 per rank, head 128: (8 + 2) * 128 rows
    assert r0["transformer.layers.0.attention.qkv.weight"] == (1280, 8192)
    assert r0["transformer.layers.39.attention.dense.weight"] == (8192, 1024)
    assert r0["transformer.layers.39.mlp.fc.weight"] == (3584, 8192)
    assert r0["transformer.layers.39.mlp.proj.weight"] == (8192, 3584)
    assert "transformer.layers.40.input_layernorm.weight" not in r0  # stage-local indices
    assert r15["lm_head.weight"] == (16032, 8192)  # 128256 / 8
    assert r15["transformer.ln_f.weight"] == (8192,)
    assert "transformer.vocab_embedding.weight" not in r15
    assert sum(1 for n in r15 if n.endswith("qkv.weight")) == 40
    assert cfg["rotary_scaling"]["type"] == "llama3" and cfg["rotary_base"] == 500000.0


def test_70b_kv_heads_of_each_rank(meta_plans):
    _, _, plans = meta_plans
    for rank in range(8):
        qkv = next(p for p in plans[rank] if p.name == "transformer.layers.5.attention.qkv.weight")
        q, k, v = qkv.pieces
        assert q.rows == (rank * 1024, (rank + 1) * 1024)
        assert k.rows == v.rows == (rank * 128, (rank + 1) * 128)


def test_meta_plan_total_bytes_is_the_model_size(meta_plans):
    _, _, plans = meta_plans
    total = sum(p.nbytes for plan in plans.values() for p in plan)
    # 70.6B params in bf16; the vocab embedding (not split without use_parallel_embedding) is
    # replicated on the 8 ranks of stage 0, norms on every rank; lm_head needs no padding (128256 % 8 == 0)
    embed = 128256 * 8192 * 2
    norms = (2 * 80 * 8192 + 8192) * 2 * 7
    assert total == 70_553_706_496 * 2 + 7 * embed + norms

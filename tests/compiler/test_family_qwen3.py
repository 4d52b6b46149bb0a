"""Qwen3 (per-head q/k RMSNorm, explicit head_dim) through every layer, against transformers' Qwen3:
the checkpoint TensorRT-LLM's converter writes, validation, the reference runtime, CPU engines at tp 1
and tp 2 (merged and kept), int8 weight-only quantization, and a bf16 GPU engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from service.compiler import convert_checkpoint
from service.compiler.build import BuildConfig, build
from service.compiler.engine.engine import Engine
from service.compiler.quantization import CalibrationSettings, QuantConfig, quantize_checkpoint
from service.compiler.reference import ReferenceModel
from tests.compiler.family_checks import (
    check_engines,
    check_gpu,
    check_reference,
    convert_both,
    hf_greedy,
    perturb_norms,
)

transformers = pytest.importorskip("transformers")


def _qwen3(tie: bool = False):
    torch.manual_seed(0)
    # head_dim 24 != hidden / heads (64 / 4): the explicit head_dim must be honoured
    c = transformers.Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                 max_position_embeddings=64, tie_word_embeddings=tie, rope_theta=20000.0)
    model = transformers.Qwen3ForCausalLM(c).eval()
    perturb_norms(model)
    return model


def test_qwen3_checkpoint_is_tensorrt_llms_layout(tmp_path):
    model = _qwen3()
    one, two = convert_both(model, tmp_path)
    cfg = json.loads((one / "config.json").read_text())
    assert cfg["architecture"] == "Qwen3ForCausalLM" and cfg["qwen_type"] == "qwen3" and cfg["qk_layernorm"] is True
    assert cfg["head_size"] == 24 and cfg["attn_bias"] is False and cfg["rotary_base"] == 20000.0
    sd = model.state_dict()
    t = load_file(str(one / "rank0.safetensors"))
    a = "model.layers.1.self_attn."
    assert torch.equal(t["transformer.layers.1.attention.q_layernorm.weight"], sd[a + "q_norm.weight"])
    assert torch.equal(t["transformer.layers.1.attention.k_layernorm.weight"], sd[a + "k_norm.weight"])
    assert torch.equal(t["transformer.layers.1.attention.qkv.weight"],
                       torch.cat([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]]))
    assert torch.equal(t["transformer.layers.1.mlp.fc.weight"], sd["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(t["transformer.layers.1.mlp.gate.weight"], sd["model.layers.1.mlp.up_proj.weight"])
    # tp 2: each rank [Q_r; K_r; V_r] (2 of 4 heads, 1 of 2 KV heads, 24 dims each), whole q/k norms,
    # lm_head padded from 97 to 98 rows and split
    r1 = load_file(str(two / "rank1.safetensors"))
    q, k, v = (sd[a + f"{x}_proj.weight"] for x in "qkv")
    assert torch.equal(r1["transformer.layers.1.attention.qkv.weight"], torch.cat([q[48:], k[24:], v[24:]]))
    assert torch.equal(r1["transformer.layers.1.attention.q_layernorm.weight"], sd[a + "q_norm.weight"])
    assert r1["lm_head.weight"].shape == (49, 64) and not r1["lm_head.weight"][-1].any()
    assert r1["transformer.vocab_embedding.weight"].shape == (97, 64)  # Qwen: no parallel embedding


def test_qwen3_reference_and_cpu_engines_match_transformers_at_tp1_and_tp2(tmp_path):
    model = _qwen3()
    one, two = convert_both(model, tmp_path)
    check_reference(model, (one, two))
    check_engines(model, one, two, tmp_path)


def test_qwen3_tied_embeddings_write_the_embedding_as_lm_head(tmp_path):
    model = _qwen3(tie=True)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float32")
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt")
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        torch.testing.assert_close(ref.forward(ids), model(ids).logits.float(), rtol=1e-4, atol=1e-4)


QUANT_ERR = {"W8A16": 0.05, "W4A16": 0.3, "FP8": 0.15}


@pytest.mark.parametrize("algo", list(QUANT_ERR))
def test_qwen3_quantization_runs_in_reference_and_engine(tmp_path, algo):
    """Weight-only int8 / int4 (no calibration) and static FP8 (calibrated by the layer runner, which
    applies Qwen3's q/k norms): q/k norms stay float, linears quantized; the CPU engine's greedy
    tokens equal the reference runtime's on the quantized checkpoint, which stays close to float."""
    model = _qwen3()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ids = torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(3))
    calib = CalibrationSettings(samples=8, seq_len=24, heldout_samples=2, token_ids=ids)
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", QuantConfig(quant_algo=algo), dtype="float32",
                        calibration=calib)
    q = load_file(str(tmp_path / "q" / "rank0.safetensors"))
    want_dtype = torch.float8_e4m3fn if algo == "FP8" else torch.int8
    assert q["transformer.layers.0.attention.qkv.weight"].dtype == want_dtype
    assert q["transformer.layers.0.attention.q_layernorm.weight"].dtype == torch.float32
    ref = ReferenceModel.from_checkpoint(tmp_path / "q")
    prompt = [5, 17, 3, 88, 41, 9, 2]
    x = torch.tensor([prompt])
    with torch.no_grad():
        want = model(x).logits.float()
    assert (ref.forward(x) - want).abs().max() / want.abs().max() < QUANT_ERR[algo]
    build(tmp_path / "q", BuildConfig(max_batch_size=1, max_input_len=16, max_seq_len=32, target="cpu"),
          tmp_path / "e")
    engine = Engine.load(tmp_path / "e")
    assert engine.generate([prompt], max_new_tokens=8).tokens[0] == ref.generate(prompt, max_new_tokens=8)
    if algo == "W8A16":
        assert hf_greedy(model, [prompt], 4)[0] == ref.generate(prompt, max_new_tokens=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qwen3_bf16_gpu_engine_matches_the_reference(tmp_path):
    check_gpu(_qwen3(), tmp_path)

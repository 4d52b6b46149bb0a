"""Gemma 2 / Gemma 3 (text) and Gemma 1 through every layer, against transformers' own models: the
checkpoint TensorRT-LLM's Gemma converter writes ((1 + w) norms, sandwich norm names, parallel
embedding at tp > 1, soft-cap / window / rope-base keys), validation, the reference runtime, CPU
engines at tp 1 and tp 2 (merged and kept) whose sliding layers keep only their window (a ring), and a
bf16 GPU engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from service.compiler import convert_checkpoint
from service.compiler.engine.model import EngineModel
from tests.compiler.family_checks import (
    NEW_TOKENS,
    PROMPTS,
    check_engines,
    check_gpu,
    check_reference,
    convert_both,
    perturb_norms,
)

transformers = pytest.importorskip("transformers")
WINDOW = 5  # smaller than every prompt and generation: the ring buffer wraps


def _gemma2():
    c = transformers.Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                                  query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                  max_position_embeddings=64)
    return c, transformers.Gemma2ForCausalLM


def _gemma3():
    # layers 0, 1 slide (local rope base 10000), layer 2 is global (base 1e6, linear scaling x2)
    c = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      sliding_window=WINDOW, query_pre_attn_scalar=16, max_position_embeddings=64,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                       "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                          "rope_theta": 1e6}})
    return c, transformers.Gemma3ForCausalLM


def _gemma1():
    c = transformers.GemmaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return c, transformers.GemmaForCausalLM


FAMILIES = {"gemma2": _gemma2, "gemma3": _gemma3, "gemma1": _gemma1}


def _model(name: str):
    torch.manual_seed(0)
    c, cls = FAMILIES[name]()
    c.architectures = [cls.__name__]
    model = cls(c).eval()
    perturb_norms(model)
    return model


def test_gemma_checkpoints_are_tensorrt_llms_layout(tmp_path):
    g2, g3 = _model("gemma2"), _model("gemma3")
    one, two = convert_both(g2, tmp_path / "g2")
    cfg = json.loads((one / "config.json").read_text())
    assert cfg["architecture"] == "Gemma2ForCausalLM" and cfg["inter_layernorms"] is True
    assert (cfg["query_pre_attn_scalar"], cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (24, 5.0, 3.0)
    assert cfg["sliding_window"] == WINDOW and cfg["layer_types"] == ["sliding_attention", "full_attention",
                                                                       "sliding_attention"]
    assert cfg["hidden_act"] == "gelu_pytorch_tanh" and cfg["use_parallel_embedding"] is False
    sd = g2.state_dict()
    t = load_file(str(one / "rank0.safetensors"))
    h, p = "model.layers.1.", "transformer.layers.1."
    for ours, hf in (("input_layernorm", "input_layernorm"), ("post_layernorm", "post_attention_layernorm"),
                     ("pre_feedforward_layernorm", "pre_feedforward_layernorm"),
                     ("post_feedforward_layernorm", "post_feedforward_layernorm")):
        assert torch.equal(t[p + ours + ".weight"], sd[h + hf + ".weight"] + 1.0), ours  # TensorRT-LLM stores 1 + w
    assert torch.equal(t["transformer.ln_f.weight"], sd["model.norm.weight"] + 1.0)
    assert torch.equal(t["lm_head.weight"], sd["model.embed_tokens.weight"])  # tied
    assert torch.equal(t[p + "mlp.fc.weight"], sd[h + "mlp.gate_proj.weight"])
    # tp 2: GemmaConfig forces a vocab-parallel embedding (rows, padded 97 -> 98 like lm_head)
    cfg2 = json.loads((two / "config.json").read_text())
    r1 = load_file(str(two / "rank1.safetensors"))
    assert cfg2["use_parallel_embedding"] is True and cfg2["embedding_sharding_dim"] == 0
    assert torch.equal(r1["transformer.vocab_embedding.weight"][:48], sd["model.embed_tokens.weight"][49:])
    assert not r1["transformer.vocab_embedding.weight"][48].any()

    one3, _ = convert_both(g3, tmp_path / "g3")
    cfg3 = json.loads((one3 / "config.json").read_text())
    assert cfg3["architecture"] == "Gemma3ForCausalLM" and cfg3["rope_local_base_freq"] == 1e4
    assert cfg3["rotary_base"] == 1e6 and cfg3["rotary_scaling"]["factor"] == 2.0
    assert cfg3["sliding_window"] == WINDOW and "_sliding_window_pattern" in cfg3
    t3, sd3 = load_file(str(one3 / "rank0.safetensors")), g3.state_dict()
    assert torch.equal(t3["transformer.layers.0.attention.q_layernorm.weight"],
                       sd3["model.layers.0.self_attn.q_norm.weight"] + 1.0)
    # tp 2 x pp 3: validate derives every rank's tensors from config.json; the reference merges it back
    from service.compiler import Mapping, validate_checkpoint
    from service.compiler.reference import ReferenceModel

    convert_checkpoint(tmp_path / "g3" / "hf", tmp_path / "g3pp", dtype="float32", mapping=Mapping(tp_size=2, pp_size=3))
    report = validate_checkpoint(tmp_path / "g3pp", strict=True)
    assert report.ok and report.world_size == 6, report.errors
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        want = g3(ids).logits.float()
    torch.testing.assert_close(ReferenceModel.from_checkpoint(tmp_path / "g3pp").forward(ids), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_reference_and_cpu_engines_match_transformers_at_tp1_and_tp2(tmp_path, name):
    model = _model(name)
    one, two = convert_both(model, tmp_path)
    check_reference(model, (one, two))
    check_engines(model, one, two, tmp_path)


def test_gemma1_reference_and_engine_match_transformers(tmp_path):
    """Gemma 1 (pre-norm, MQA) comes with the family: tp 1 and tp 2 (one KV head duplicated)."""
    model = _model("gemma1")
    one, two = convert_both(model, tmp_path)
    check_reference(model, (one, two))
    check_engines(model, one, two, tmp_path)


def test_sliding_layers_keep_only_their_window(tmp_path):
    """The engine's cache of a sliding layer is ``window`` slots long (a ring), a global layer's
    max_seq_len; decoding far past the window still matches the full-length reference."""
    from service.compiler.build import BuildConfig, build
    from service.compiler.engine.engine import Engine
    from service.compiler.reference import ReferenceModel

    model = _model("gemma2")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float32")
    build(tmp_path / "ckpt", BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=48, target="cpu"),
          tmp_path / "e")
    engine = Engine.load(tmp_path / "e")
    m: EngineModel = engine.model
    spans = [m.k_cache[lp.cache].shape[2] for lp in m.plans]
    assert spans == [WINDOW, 48, WINDOW]
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt")
    got = engine.generate(PROMPTS, max_new_tokens=30).tokens
    assert got == [ref.generate(p, max_new_tokens=30) for p in PROMPTS]
    assert NEW_TOKENS > WINDOW


def test_gemma2_int8_weight_only_runs_in_reference_and_engine(tmp_path):
    """W8A16 through the generic calibration-free path: linears int8, the (1 + w) norms float; the CPU
    engine's greedy tokens equal the reference runtime's on the quantized checkpoint. Calibrated
    algorithms are refused before any work (the layer runner has no Gemma block)."""
    from service.compiler.build import BuildConfig, build
    from service.compiler.engine.engine import Engine
    from service.compiler.errors import UnsupportedArchitecture
    from service.compiler.quantization import QuantConfig, quantize_checkpoint
    from service.compiler.reference import ReferenceModel

    model = _model("gemma2")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", QuantConfig(quant_algo="W8A16"), dtype="float32")
    q = load_file(str(tmp_path / "q" / "rank0.safetensors"))
    assert q["transformer.layers.0.mlp.fc.weight"].dtype == torch.int8
    assert q["transformer.layers.0.pre_feedforward_layernorm.weight"].dtype == torch.float32
    ref = ReferenceModel.from_checkpoint(tmp_path / "q")
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = model(x).logits.float()
    assert (ref.forward(x) - want).abs().max() / want.abs().max() < 0.05
    build(tmp_path / "q", BuildConfig(max_batch_size=1, max_input_len=16, max_seq_len=32, target="cpu"),
          tmp_path / "e")
    engine = Engine.load(tmp_path / "e")
    assert engine.generate([PROMPTS[0]], max_new_tokens=10).tokens[0] == ref.generate(PROMPTS[0], max_new_tokens=10)
    with pytest.raises(UnsupportedArchitecture, match="layer runner"):
        quantize_checkpoint(tmp_path / "hf", tmp_path / "fp8", QuantConfig(quant_algo="FP8"), dtype="float32")
    assert not (tmp_path / "fp8").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_bf16_gpu_engine_matches_the_reference(tmp_path, name):
    check_gpu(_model(name), tmp_path)

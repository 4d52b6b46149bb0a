"""The decoder described by data (``models/spec.py``): each family's spec, the refusal of kinds nobody
runs yet, and the spec's vocabulary beyond today's families (sandwich (1 + w) norms, soft-caps, sliding
windows, embedding scale, q/k norm) executed by the one reference model and the one engine model
exactly as transformers' Gemma 2 and Qwen3 (the next families, issue 17, need only their spec and
weight map)."""

from __future__ import annotations

import pytest
import torch

from service.compiler.engine.model import EngineModel
from service.compiler.errors import UnsupportedArchitecture
from service.compiler.models import block_specs, engine_weight_map
from service.compiler.models.spec import (
    MLP,
    Attention,
    Block,
    ModelSpec,
    Norm,
    Rope,
)
from service.compiler.reference import ReferenceModel

transformers = pytest.importorskip("transformers")

BASE = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_size": 16, "vocab_size": 97,
        "num_hidden_layers": 2, "intermediate_size": 128, "norm_epsilon": 1e-5, "max_position_embeddings": 64,
        "rotary_base": 10000.0, "rotary_scaling": None, "dtype": "float32"}


def test_each_family_declares_its_spec():
    llama = block_specs({**BASE, "architecture": "LlamaForCausalLM", "hidden_act": "silu"})
    b = llama.blocks[0]
    assert len(llama.blocks) == 2 and len(set(llama.blocks)) == 1
    assert (b.norm.kind, b.placement, b.attention.kind, b.mlp.kind, b.mlp.act) == ("rms", "pre", "full", "gated", "silu")
    assert b.attention.rope == Rope(16, 10000.0) and not b.attention.qkv_bias and llama.final_norm == b.norm
    qwen2 = block_specs({**BASE, "architecture": "Qwen2ForCausalLM", "attn_bias": True}).blocks[0].attention
    assert qwen2.qkv_bias and not qwen2.o_bias  # Qwen2: q/k/v biases, none on o_proj
    gpt2 = block_specs({**BASE, "architecture": "GPTForCausalLM", "hidden_act": "gelu_new"})
    g = gpt2.blocks[0]
    assert (g.norm.kind, g.norm.bias, g.attention.rope, g.mlp.kind, g.mlp.act) == ("layernorm", True, None, "plain",
                                                                                    "gelu_tanh")
    assert gpt2.learned_positions == 64 and g.attention.qkv_bias and g.attention.o_bias and g.mlp.bias
    opt = {**BASE, "architecture": "OPTForCausalLM", "hidden_act": "relu"}
    assert block_specs(opt).blocks[0].placement == "pre" and block_specs(opt).final_norm is not None
    post = block_specs({**opt, "do_layer_norm_before": False})
    assert post.blocks[0].placement == "post" and post.final_norm is None  # OPT post-LN: no ln_f
    layers = [{"attention": {"impl": "attention", "num_key_value_heads": 1}, "ffn": {"impl": "linear"}},
              {"attention": {"impl": "no_op"}, "ffn": {"impl": "mlp", "intermediate_size": 96}}]
    decilm = block_specs({**BASE, "architecture": "DeciLMForCausalLM", "layer_configs": layers})
    assert [(x.attention.kind, x.attention.num_kv_heads, x.mlp.kind, x.mlp.intermediate_size, x.mlp_module)
            for x in decilm.blocks] == [("full", 1, "linear", 0, "ffn"), ("none", 0, "gated", 96, "ffn")]
    assert decilm.attention_layers == [0]
    table = dict(engine_weight_map({**BASE, "architecture": "DeciLMForCausalLM", "layer_configs": layers}))
    assert table["layers.0.ffn_linear"] == ("transformer.layers.0.ffn.weight",)
    assert table["layers.1.gate_up"] == ("transformer.layers.1.ffn.fc.weight", "transformer.layers.1.ffn.gate.weight")
    assert "layers.1.attn_norm" not in table  # a no-op part has no tensor, not even its norm


def _spec(mlp: MLP | None = None, attention: Attention | None = None) -> ModelSpec:
    mlp = mlp or MLP("gated", "silu", intermediate_size=128)
    attention = attention or Attention("full", 4, 2, 16, rope=Rope(16))
    return ModelSpec("LlamaForCausalLM", 64, 97, (Block(attention, mlp, Norm("rms", 1e-5)),) * 2,
                     final_norm=Norm("rms", 1e-5))


def test_unsupported_kinds_are_refused_before_anything_is_built():
    moe = _spec(MLP("moe", "silu", intermediate_size=128))  # a MoE MLP without experts (models/moe.py makes real ones)
    with pytest.raises(UnsupportedArchitecture, match="Mixture-of-Experts MLP needs num_experts > 1"):
        moe.check()
    cfg = {**BASE, "architecture": "LlamaForCausalLM"}
    # no weights at all: the refusal comes before any tensor is looked up, placed or allocated
    with pytest.raises(UnsupportedArchitecture, match="Mixture-of-Experts MLP needs"):
        EngineModel(cfg, {}, max_batch=1, max_seq=8, spec=moe)
    with pytest.raises(UnsupportedArchitecture, match="Mixture-of-Experts MLP needs"):
        ReferenceModel(cfg, {}, spec=moe)
    with pytest.raises(UnsupportedArchitecture, match="top_k 9"):
        _spec(MLP("moe", "silu", intermediate_size=32, num_experts=8, top_k=9)).check()
    with pytest.raises(UnsupportedArchitecture, match="attention kind 'paged' is not known"):
        _spec(attention=Attention("paged", 4, 2, 16)).check()
    with pytest.raises(UnsupportedArchitecture, match="activation 'swiglu2'"):
        _spec(MLP("gated", "swiglu2", intermediate_size=128)).check()
    with pytest.raises(UnsupportedArchitecture, match="swiglu acts on a plain MLP"):  # partial rotary runs (Phi-4-mini)
        EngineModel(cfg, {}, max_batch=1, max_seq=8, spec=_spec(MLP("gated", "swiglu", intermediate_size=128)))


# -- Gemma 2 and Qwen3 blocks, written as data --------------------------------------------------

def _rope_theta(c) -> float:
    return float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])


def _gemma2():
    c = transformers.Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                  query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                  max_position_embeddings=64, attn_implementation="eager")
    norm = Norm("rms_1p", c.rms_norm_eps)
    blocks = tuple(
        Block(Attention("sliding" if kind == "sliding_attention" else "full", 4, 2, 16, rope=Rope(16, _rope_theta(c)),
                        softcap=c.attn_logit_softcapping, scale=c.query_pre_attn_scalar ** -0.5,
                        window=c.sliding_window if kind == "sliding_attention" else None),
              MLP("gated", "gelu_tanh", intermediate_size=128), norm, "sandwich")
        for kind in c.layer_types)
    assert {b.attention.kind for b in blocks} == {"sliding", "full"}
    spec = ModelSpec("Gemma2ForCausalLM", 64, 97, blocks, final_norm=norm, embedding_scale=64 ** 0.5,
                     final_softcap=c.final_logit_softcapping, tied_head=True)
    # HF pre_feedforward_layernorm is the block's pre-MLP norm (post_layernorm in TensorRT-LLM's names)
    return transformers.Gemma2ForCausalLM(c), spec, {"pre_feedforward_layernorm": "post_layernorm",
                                                     "post_attention_layernorm": "post_attention_layernorm"}


def _qwen3():
    c = transformers.Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                                 tie_word_embeddings=False)
    norm = Norm("rms", c.rms_norm_eps)
    attn = Attention("full", 4, 2, 16, rope=Rope(16, _rope_theta(c)), qk_norm=norm)
    spec = ModelSpec("Qwen3ForCausalLM", 64, 97, (Block(attn, MLP("gated", "silu", intermediate_size=128), norm),) * 2,
                     final_norm=norm)
    return transformers.Qwen3ForCausalLM(c), spec, {"post_attention_layernorm": "post_layernorm"}


def _checkpoint_tensors(sd: dict, n_layers: int, norm_names: dict) -> dict[str, torch.Tensor]:
    """HF tensors under TensorRT-LLM checkpoint names (what a family's converter table writes)."""
    w = {"transformer.vocab_embedding.weight": sd["model.embed_tokens.weight"],
         "transformer.ln_f.weight": sd["model.norm.weight"],
         "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(n_layers):
        h, p = f"model.layers.{i}.", f"transformer.layers.{i}."
        a = h + "self_attn."
        w[p + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        for hf, ours in {**norm_names, "post_feedforward_layernorm": "post_feedforward_layernorm"}.items():
            if h + hf + ".weight" in sd:
                w[p + ours + ".weight"] = sd[h + hf + ".weight"]
        w[p + "attention.qkv.weight"] = torch.cat([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"],
                                                   sd[a + "v_proj.weight"]])
        w[p + "attention.dense.weight"] = sd[a + "o_proj.weight"]
        if a + "q_norm.weight" in sd:
            w[p + "attention.q_layernorm.weight"] = sd[a + "q_norm.weight"]
            w[p + "attention.k_layernorm.weight"] = sd[a + "k_norm.weight"]
        w[p + "mlp.fc.weight"] = sd[h + "mlp.gate_proj.weight"]
        w[p + "mlp.gate.weight"] = sd[h + "mlp.up_proj.weight"]
        w[p + "mlp.proj.weight"] = sd[h + "mlp.down_proj.weight"]
    return w


def _engine_tensors(w: dict, n_layers: int) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> engine tensors (the weight map: qkv as is, gate_up = fc over gate)."""
    out = {"embed": w["transformer.vocab_embedding.weight"], "final_norm": w["transformer.ln_f.weight"],
           "lm_head": w["lm_head.weight"]}
    names = {"attn_norm": "input_layernorm", "qkv": "attention.qkv", "o": "attention.dense", "mlp_norm": "post_layernorm",
             "down": "mlp.proj", "q_norm": "attention.q_layernorm", "k_norm": "attention.k_layernorm",
             "post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
    for i in range(n_layers):
        p = f"transformer.layers.{i}."
        for e, c in names.items():
            if p + c + ".weight" in w:
                out[f"layers.{i}.{e}"] = w[p + c + ".weight"]
        out[f"layers.{i}.gate_up"] = torch.cat([w[p + "mlp.fc.weight"], w[p + "mlp.gate.weight"]])
    return out


@pytest.mark.parametrize("family", [_gemma2, _qwen3], ids=["gemma2", "qwen3"])
def test_new_block_kinds_match_transformers_in_the_reference_and_the_engine(family):
    torch.manual_seed(0)
    hf, spec, norm_names = family()
    hf.eval()
    with torch.no_grad():
        for name, t in hf.named_parameters():
            if "norm" in name:  # non-trivial norm weights (Gemma's start at 0, Qwen's at 1)
                t.add_(0.3 * torch.randn_like(t))
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    L = len(spec.blocks)
    ckpt = _checkpoint_tensors(sd, L, norm_names)
    ids = torch.tensor([[3, 17, 42, 5, 88, 60, 1, 29, 71, 13, 9, 50], [8, 8, 2, 64, 33, 7, 70, 11, 4, 96, 12, 5]])
    with torch.no_grad():
        want = hf(ids).logits.float()
    cfg = {"architecture": spec.architecture, "dtype": "float32"}
    ref = ReferenceModel(cfg, ckpt, spec=spec)
    torch.testing.assert_close(ref.forward(ids), want, rtol=1e-4, atol=1e-4)
    cache = ref.new_cache()  # incremental decoding past the sliding window
    steps = [ref.forward(ids[:, :5], cache)] + [ref.forward(ids[:, t:t + 1], cache) for t in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-4, atol=1e-4)

    engine = EngineModel(cfg, _engine_tensors(ckpt, L), max_batch=2, max_seq=32, spec=spec)
    with torch.no_grad():
        torch.testing.assert_close(engine.prefill(ids, torch.full((2,), 12), all_logits=True), want,
                                   rtol=1e-4, atol=1e-4)
        engine.prefill(ids[:, :5], torch.full((2,), 5))
        for t in range(5, ids.shape[1]):
            got = engine.decode(ids[:, t], torch.full((2,), t))
            torch.testing.assert_close(got, want[:, t], rtol=1e-4, atol=1e-4)


def test_an_engine_whose_layout_is_not_its_architectures_is_refused_clearly(tmp_path):
    import json

    from service.compiler.engine.engine import Engine
    from service.compiler.errors import InvalidCheckpoint

    cfg = {"backend": "torch", "engine": {"layout": "kiln-gpt-fused/1", "arch": "cpu"},
           "pretrained_config": {**BASE, "architecture": "LlamaForCausalLM"}, "build_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidCheckpoint, match="LlamaForCausalLM engines have layout 'kiln-llama-fused/1'"):
        Engine.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "engine": {"layout": "kiln-llama-fused/0"}}))
    with pytest.raises(InvalidCheckpoint, match="Engine runs torch engines of layout kiln-llama-fused/1, kiln-gpt"):
        Engine.load(tmp_path)

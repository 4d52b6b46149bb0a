"""Gemma family (``GemmaForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` text) -> TensorRT-LLM
checkpoint, as TensorRT-LLM's Gemma converter writes it (``models/gemma/config.py``, ``convert.py``,
``model.py``; facts and citations in docs/reference/families.md):

* every RMSNorm weight (the four per layer, q/k norms, ``ln_f``) is stored as ``1 + w`` (added in
  float32, then cast), so the checkpoint's norms are plain RMSNorms;
* ``post_attention_layernorm`` -> ``post_layernorm``; Gemma 2 / 3 (``inter_layernorms``) add
  ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` under their HF names;
  ``self_attn.q_norm`` / ``k_norm`` (Gemma 3) -> ``attention.q_layernorm`` / ``k_layernorm``;
* qkv fused per rank, ``gate_proj`` -> ``mlp.fc`` (the gelu-tanh branch), ``up_proj`` -> ``mlp.gate``;
* ``lm_head.weight`` is the embedding (tied), split by rows; with tp > 1 the embedding itself is
  split by rows too (GemmaConfig forces ``use_parallel_embedding = tp_size > 1``, sharding dim 0);
* config: ``query_pre_attn_scalar``, ``final_logit_softcapping``, ``attn_logit_softcapping``
  (Gemma 2), ``_sliding_window_pattern`` / ``rope_local_base_freq`` / ``sliding_window`` (Gemma 3),
  ``inter_layernorms``. Kiln adds ``layer_types`` (and Gemma 2's ``sliding_window``, which
  TensorRT-LLM leaves to the runtime's attention-window setting) so the checkpoint alone says which
  layers slide.

Embeddings are scaled by sqrt(hidden_size) in the activation dtype at run time (not in the weights).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..checkpoint.mapping import Mapping
from ..errors import UnsupportedArchitecture
from ..sources.weights import WeightSource
from .base import (
    RawTensorSpec,
    TableArch,
    W,
    column,
    pad_vocab,
    plus_one,
    qkv_separate,
    replicate,
    row,
    vocab_parallel,
)
from .hf_config import base_quantization, rope_settings
from .spec import MLP, SANDWICH_NORM_NAMES, Attention, Block, ModelSpec, Norm, Rope, activation

if TYPE_CHECKING:
    import torch

GEMMA, GEMMA2, GEMMA3 = "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"
GEMMA_LAYOUT = "kiln-gemma-fused/1"
LAYER_TYPES = ("sliding_attention", "full_attention")


def _layer_types(hf: dict, arch: str, n: int) -> list[str]:
    """Which layers slide: HF's ``layer_types`` when given, else Gemma 2's alternation (even layers
    slide) or Gemma 3's pattern (every ``sliding_window_pattern``-th layer is global)."""
    given = hf.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != n or any(t not in LAYER_TYPES for t in given):
            raise UnsupportedArchitecture(f"config.json: layer_types must list {n} of {', '.join(LAYER_TYPES)}")
        return list(given)
    if arch == GEMMA2:
        return [LAYER_TYPES[i % 2] for i in range(n)]
    pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _gemma3_ropes(hf: dict) -> tuple[float, dict | None, float]:
    """(global base, global scaling, local base): transformers 5 nests ``rope_parameters`` per layer
    type; 4.x has ``rope_theta`` / ``rope_scaling`` (global) and ``rope_local_base_freq``."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        base, scaling = rope_settings({"rope_parameters": params["full_attention"]})
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedArchitecture("Gemma 3 sliding layers with rope scaling are not supported")
        return base, scaling, float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))
    base, scaling = rope_settings(hf)
    return base, scaling, float(hf.get("rope_local_base_freq", 10000.0))


def block_specs(cfg: dict) -> ModelSpec:
    """Gemma 1: pre-norm blocks; Gemma 2 / 3: sandwich norms (TensorRT-LLM's names), interleaved
    sliding / global attention, ``query_pre_attn_scalar`` ** -0.5 as the attention scale; Gemma 2
    soft-caps the attention and final logits; Gemma 3 normalizes q and k per head and turns its
    sliding layers with ``rope_local_base_freq`` (unscaled). RMSNorms are plain: the stored weight is
    already 1 + w. GeGLU (gelu tanh) MLPs; embeddings scaled by sqrt(hidden_size)."""
    arch = cfg["architecture"]
    H, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    nkv, d, n = int(cfg.get("num_key_value_heads") or nh), int(cfg["head_size"]), int(cfg["num_hidden_layers"])
    if cfg.get("attn_bias") or cfg.get("mlp_bias"):
        raise UnsupportedArchitecture(f"{arch} with attention or MLP biases is not supported")
    norm = Norm("rms", float(cfg.get("norm_epsilon") or 1e-6))
    sandwich = arch in (GEMMA2, GEMMA3)
    scale = None
    if sandwich:
        qpas = float(cfg["query_pre_attn_scalar"])
        scale = None if qpas == d else qpas ** -0.5  # None: the default 1/sqrt(d), the fast attention paths
    sc = cfg.get("rotary_scaling") or None
    global_rope = Rope(d, float(cfg.get("rotary_base") or 10000.0), tuple(sorted(sc.items())) if sc else None)
    local_rope = Rope(d, float(cfg.get("rope_local_base_freq") or 10000.0)) if arch == GEMMA3 else global_rope
    softcap = cfg.get("attn_logit_softcapping") if arch in (GEMMA2, GEMMA3) else None
    types = cfg.get("layer_types") or (["full_attention"] * n)
    if len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise UnsupportedArchitecture(f"config.json: layer_types must list {n} of {', '.join(LAYER_TYPES)}")
    mlp = MLP("gated", activation(cfg.get("hidden_act"), "gelu_pytorch_tanh"), False, int(cfg["intermediate_size"]))
    blocks = []
    for t in types:
        sliding = t == "sliding_attention"
        attn = Attention("sliding" if sliding else "full", nh, nkv, d, rope=local_rope if sliding else global_rope,
                         qk_norm=norm if arch == GEMMA3 else None, softcap=float(softcap) if softcap else None,
                         scale=scale, window=int(cfg["sliding_window"]) if sliding else None)
        blocks.append(Block(attn, mlp, norm, "sandwich", norm_names=SANDWICH_NORM_NAMES) if sandwich
                      else Block(attn, mlp, norm))
    final = cfg.get("final_logit_softcapping")
    return ModelSpec(arch, H, int(cfg["vocab_size"]), tuple(blocks), final_norm=norm, embedding_scale=math.sqrt(H),
                     final_softcap=float(final) if final else None, tied_head=True)


def engine_weight_map(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(engine tensor, checkpoint tensors concatenated along dim 0): the fused Llama slots plus the
    sandwich's ``post_attn_norm`` / ``post_mlp_norm`` and Gemma 3's ``q_norm`` / ``k_norm``. ``embed``
    is a row slice of the vocabulary in a kept-tp engine (TensorRT-LLM's parallel embedding)."""
    spec = block_specs(cfg)
    table: list[tuple[str, tuple[str, ...]]] = [("embed", ("transformer.vocab_embedding.weight",))]
    for i, b in enumerate(spec.blocks):
        p, e = f"transformer.layers.{i}.", f"layers.{i}."
        pre_attn, pre_mlp, post_attn, post_mlp = b.norm_names
        table += [(e + "attn_norm", (p + pre_attn + ".weight",)), (e + "qkv", (p + "attention.qkv.weight",)),
                  (e + "o", (p + "attention.dense.weight",)), (e + "mlp_norm", (p + pre_mlp + ".weight",)),
                  (e + "gate_up", (p + "mlp.fc.weight", p + "mlp.gate.weight")), (e + "down", (p + "mlp.proj.weight",))]
        if b.placement == "sandwich":
            table += [(e + "post_attn_norm", (p + post_attn + ".weight",)),
                      (e + "post_mlp_norm", (p + post_mlp + ".weight",))]
        if b.attention.qk_norm is not None:
            table += [(e + "q_norm", (p + "attention.q_layernorm.weight",)),
                      (e + "k_norm", (p + "attention.k_layernorm.weight",))]
    return table + [("final_norm", ("transformer.ln_f.weight",)), ("lm_head", ("lm_head.weight",))]


class GemmaFamily(TableArch):
    hf_architectures = (GEMMA, GEMMA2, GEMMA3)
    trt_architectures = hf_architectures
    engine_layout = GEMMA_LAYOUT
    block_specs = staticmethod(block_specs)
    engine_weight_map = staticmethod(engine_weight_map)
    hf_prefix_aliases = (("model.", ""),)

    def trt_config(self, hf: dict, dtype: str, mapping: Mapping) -> dict:
        arch = hf["architectures"][0]
        if hf.get("model_type") not in (None, "gemma", "gemma2", "gemma3_text"):
            raise UnsupportedArchitecture(f"{arch} with model_type {hf.get('model_type')!r} is not supported",
                                          hint="Gemma 3: the text-only model (model_type gemma3_text)")
        if hf.get("attention_bias"):
            raise UnsupportedArchitecture(f"{arch} with attention_bias=true is not supported")
        if hf.get("use_bidirectional_attention"):
            raise UnsupportedArchitecture(f"{arch} with use_bidirectional_attention=true is not supported")
        hidden, heads, n = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        head_size = int(hf.get("head_dim") or hidden // heads)
        # HF Gemma runs hidden_activation (gelu_pytorch_tanh when unset; Gemma 1's "gelu" hidden_act is ignored)
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
        activation(act, "gelu_pytorch_tanh")
        if arch == GEMMA3:
            rope_theta, scaling, local_base = _gemma3_ropes(hf)
        else:
            rope_theta, scaling = rope_settings(hf)
            local_base = None
        if scaling is not None and scaling["type"] not in ("linear", "llama3"):
            raise UnsupportedArchitecture(f"rope scaling type {scaling['type']!r} is not supported (supported: linear)")
        cfg = {
            "architecture": arch,
            "dtype": dtype,
            "logits_dtype": "float32",
            "vocab_size": int(hf["vocab_size"]),
            "max_position_embeddings": int(hf.get("max_position_embeddings", 8192)),
            "hidden_size": hidden,
            "num_hidden_layers": n,
            "num_attention_heads": heads,
            "num_key_value_heads": int(hf.get("num_key_value_heads") or heads),
            "head_size": head_size,
            "intermediate_size": int(hf["intermediate_size"]),
            "hidden_act": act,
            "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
            "position_embedding_type": "rope_gpt_neox",
            "rotary_base": rope_theta,
            "rotary_scaling": scaling,
            "mapping": mapping.to_dict(),
            "quantization": base_quantization(),
            "use_parallel_embedding": mapping.tp_size > 1,  # GemmaConfig forces it
            "embedding_sharding_dim": 0,
            "attn_bias": False,
            "mlp_bias": False,
            "inter_layernorms": arch in (GEMMA2, GEMMA3),
            "tie_word_embeddings": True,
        }
        if arch in (GEMMA2, GEMMA3):
            window = hf.get("sliding_window")
            if not isinstance(window, int) or window < 1:
                raise UnsupportedArchitecture(f"config.json: {arch} needs a positive sliding_window, got {window!r}")
            cfg.update({"query_pre_attn_scalar": hf.get("query_pre_attn_scalar") or head_size,
                        "final_logit_softcapping": hf.get("final_logit_softcapping"),
                        "sliding_window": window, "layer_types": _layer_types(hf, arch, n)})
        if arch == GEMMA2:
            cfg["attn_logit_softcapping"] = hf.get("attn_logit_softcapping")
        if arch == GEMMA3:
            cfg["_sliding_window_pattern"] = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern")
                                                 or 6)
            cfg["rope_local_base_freq"] = local_base
            if hf.get("attn_logit_softcapping"):
                cfg["attn_logit_softcapping"] = hf["attn_logit_softcapping"]
        cfg["mapping"] = mapping.config_dict(n)
        block_specs(cfg).check()
        return cfg

    def tensor_specs(self, cfg: dict, rank: int, m: Mapping, dt: torch.dtype | str,
                     shapes_only: bool) -> list[RawTensorSpec]:
        tp = m.tp_size
        H, nh, d, inter = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_size"], cfg["intermediate_size"]
        nkv = cfg.get("num_key_value_heads") or nh
        qkv_rows = (nh // tp + 2 * max(nkv // tp, 1)) * d
        vocab_rows = pad_vocab(cfg["vocab_size"], tp) // tp
        arch = cfg["architecture"]
        out: list[RawTensorSpec] = []
        if m.is_first_pp_rank(rank):
            rows = vocab_rows if cfg.get("use_parallel_embedding") and tp > 1 else cfg["vocab_size"]
            out.append(("transformer.vocab_embedding.weight", (rows, H), dt))
        for local, _ in enumerate(m.pp_layers(cfg["num_hidden_layers"], m.pp_rank(rank))):
            p = f"transformer.layers.{local}."
            out += [(p + "input_layernorm.weight", (H,), dt), (p + "attention.qkv.weight", (qkv_rows, H), dt),
                    (p + "attention.dense.weight", (H, nh * d // tp), dt), (p + "post_layernorm.weight", (H,), dt),
                    (p + "mlp.fc.weight", (inter // tp, H), dt), (p + "mlp.gate.weight", (inter // tp, H), dt),
                    (p + "mlp.proj.weight", (H, inter // tp), dt)]
            if arch in (GEMMA2, GEMMA3):
                out += [(p + "pre_feedforward_layernorm.weight", (H,), dt),
                        (p + "post_feedforward_layernorm.weight", (H,), dt)]
            if arch == GEMMA3:
                out += [(p + "attention.q_layernorm.weight", (d,), dt), (p + "attention.k_layernorm.weight", (d,), dt)]
        if m.is_last_pp_rank(rank):
            out += [("transformer.ln_f.weight", (H,), dt), ("lm_head.weight", (vocab_rows, H), dt)]
        return out

    def layer_table(self, cfg: dict, i: int) -> list[W]:
        h = f"model.layers.{i}."
        a, mlp = h + "self_attn.", h + "mlp."
        arch = cfg["architecture"]
        table = [
            W("input_layernorm.weight", h + "input_layernorm.weight", plus_one),
            W("attention.qkv.weight", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), qkv_separate),
            W("attention.dense.weight", a + "o_proj.weight", row),
            W("post_layernorm.weight", h + "post_attention_layernorm.weight", plus_one),
            W("mlp.fc.weight", mlp + "gate_proj.weight", column),  # the gelu branch
            W("mlp.gate.weight", mlp + "up_proj.weight", column),
            W("mlp.proj.weight", mlp + "down_proj.weight", row),
        ]
        if arch in (GEMMA2, GEMMA3):
            table += [W("pre_feedforward_layernorm.weight", h + "pre_feedforward_layernorm.weight", plus_one),
                      W("post_feedforward_layernorm.weight", h + "post_feedforward_layernorm.weight", plus_one)]
        if arch == GEMMA3:
            table += [W("attention.q_layernorm.weight", a + "q_norm.weight", plus_one),
                      W("attention.k_layernorm.weight", a + "k_norm.weight", plus_one)]
        return table

    def global_table(self, cfg: dict, first: bool, last: bool, source: WeightSource) -> list[W]:
        out = []
        embed = "model.embed_tokens.weight"
        if first:
            parallel = cfg.get("use_parallel_embedding") and cfg["mapping"]["tp_size"] > 1
            out.append(W("transformer.vocab_embedding.weight", embed, vocab_parallel if parallel else replicate))
        if last:
            out.append(W("transformer.ln_f.weight", "model.norm.weight", plus_one))
            out.append(W("lm_head.weight", embed, vocab_parallel))  # tied: the embedding, split by rows
        return out


GEMMA_FAMILY = GemmaFamily()

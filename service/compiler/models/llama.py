"""Llama family (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) -> TensorRT-LLM checkpoint.

Names and split rules follow TensorRT-LLM's llama converter: fused qkv per rank [Q_r; K_r; V_r],
``gate_proj`` -> ``mlp.fc`` (the activated branch), ``up_proj`` -> ``mlp.gate``, ``o_proj`` and
``down_proj`` row-parallel, ``lm_head`` zero-padded to a multiple of tp_size. Tied embeddings
(SmolLM2, Llama-3.2) write ``lm_head.weight`` from ``embed_tokens``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..checkpoint.mapping import Mapping
from ..errors import InvalidArgument, UnsupportedArchitecture
from ..sources.weights import WeightSource
from .base import (
    RawTensorSpec,
    TableArch,
    W,
    column,
    pad_vocab,
    qkv_separate,
    replicate,
    row,
    vocab_parallel,
)
from .hf_config import base_quantization, rope_settings
from .spec import MLP, Attention, Block, ModelSpec, Norm, activation, rope_of

if TYPE_CHECKING:
    import torch

SUPPORTED_ROPE = {None, "linear", "llama3"}
ENGINE_LAYOUT = "kiln-llama-fused/1"


def block_specs(cfg: dict) -> ModelSpec:
    """Every layer: RMSNorm pre-norm, full GQA attention with GPT-NeoX rope (qkv bias for Qwen2 and
    ``attn_bias``), gated silu MLP; final RMSNorm."""
    nh = int(cfg["num_attention_heads"])
    d = int(cfg.get("head_size") or int(cfg["hidden_size"]) // nh)
    if cfg.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox":
        raise UnsupportedArchitecture(f"config.json: position_embedding_type {cfg.get('position_embedding_type')!r} "
                                      f"is not supported for {cfg['architecture']} (expected rope_gpt_neox)")
    for flag in ("qk_layernorm", "residual_mlp", "use_sliding_window"):
        if cfg.get(flag):
            raise UnsupportedArchitecture(f"config.json: {flag}=true is not supported for {cfg['architecture']}")
    bias = bool(cfg.get("attn_bias"))
    norm = Norm("rms", float(cfg.get("norm_epsilon") or 1e-6))
    attn = Attention("full", nh, int(cfg.get("num_key_value_heads") or nh), d, qkv_bias=bias,
                     o_bias=bias and cfg["architecture"] != "Qwen2ForCausalLM", rope=rope_of(cfg, d))
    mlp = MLP("gated", activation(cfg.get("hidden_act"), "silu"), bool(cfg.get("mlp_bias")),
              int(cfg["intermediate_size"]))
    return ModelSpec(cfg["architecture"], int(cfg["hidden_size"]), int(cfg["vocab_size"]),
                     (Block(attn, mlp, norm),) * int(cfg["num_hidden_layers"]), final_norm=norm,
                     tied_head=bool(cfg.get("tie_word_embeddings")))


def engine_weight_map(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(engine tensor, checkpoint tensors concatenated along dim 0), global layer indices: qkv as
    stored, ``gate_up`` = ``mlp.fc`` (the silu branch) over ``mlp.gate``."""
    spec = block_specs(cfg)
    table: list[tuple[str, tuple[str, ...]]] = [("embed", ("transformer.vocab_embedding.weight",))]
    for i, b in enumerate(spec.blocks):
        p, e = f"transformer.layers.{i}.", f"layers.{i}."
        table += [(e + "attn_norm", (p + "input_layernorm.weight",)), (e + "qkv", (p + "attention.qkv.weight",)),
                  (e + "o", (p + "attention.dense.weight",)), (e + "mlp_norm", (p + "post_layernorm.weight",)),
                  (e + "gate_up", (p + "mlp.fc.weight", p + "mlp.gate.weight")),
                  (e + "down", (p + "mlp.proj.weight",))]
        table += [(e + "qkv_bias", (p + "attention.qkv.bias",))] if b.attention.qkv_bias else []
        table += [(e + "o_bias", (p + "attention.dense.bias",))] if b.attention.o_bias else []
        if b.mlp.bias:
            table += [(e + "gate_up_bias", (p + "mlp.fc.bias", p + "mlp.gate.bias")), (e + "down_bias", (p + "mlp.proj.bias",))]
    return table + [("final_norm", ("transformer.ln_f.weight",)), ("lm_head", ("lm_head.weight",))]


class LlamaFamily(TableArch):
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    trt_architectures = hf_architectures
    engine_layout = ENGINE_LAYOUT
    block_specs = staticmethod(block_specs)
    engine_weight_map = staticmethod(engine_weight_map)
    hf_prefix_aliases = (("model.", ""),)

    def trt_config(self, hf: dict, dtype: str, mapping: Mapping) -> dict:
        arch = hf["architectures"][0]
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        head_size = int(hf.get("head_dim") or hidden // heads)
        rope_theta, scaling = rope_settings(hf)
        if scaling is not None and scaling["type"] not in SUPPORTED_ROPE:
            raise UnsupportedArchitecture(
                f"rope scaling type {scaling['type']!r} is not supported (supported: linear, llama3)"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"{arch} with hidden_act={hf.get('hidden_act')!r} is not supported")
        qwen = arch == "Qwen2ForCausalLM"
        if qwen and hf.get("use_sliding_window"):
            raise UnsupportedArchitecture("Qwen2 with use_sliding_window=true is not supported")
        attn_bias = True if qwen else bool(hf.get("attention_bias", False))
        cfg = {
            "architecture": arch,
            "dtype": dtype,
            "logits_dtype": "float32",
            "vocab_size": int(hf["vocab_size"]),
            "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
            "hidden_size": hidden,
            "num_hidden_layers": int(hf["num_hidden_layers"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(hf.get("num_key_value_heads") or heads),
            "head_size": head_size,
            "intermediate_size": int(hf["intermediate_size"]),
            "hidden_act": "silu",
            "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
            "position_embedding_type": "rope_gpt_neox",
            "rotary_base": rope_theta,
            "rotary_scaling": scaling,
            "mapping": mapping.to_dict(),
            "quantization": base_quantization(),
            "use_parallel_embedding": False,
            "embedding_sharding_dim": 0,
            "mlp_bias": bool(hf.get("mlp_bias", False)),
            "attn_bias": attn_bias,
            "residual_mlp": False,
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "qk_layernorm": False,
        }
        if qwen:
            cfg["qwen_type"] = "qwen2"
        cfg["mapping"] = mapping.config_dict(cfg["num_hidden_layers"])
        return cfg

    # -- the spec: names, shapes and dtypes per rank, from config.json alone --------------------
    def tensor_specs(self, cfg: dict, rank: int, m: Mapping, dt: torch.dtype | str,
                     shapes_only: bool) -> list[RawTensorSpec]:
        tp = m.tp_size
        H, nh, d, inter = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_size"], cfg["intermediate_size"]
        nkv = cfg.get("num_key_value_heads") or nh
        kv_r = max(nkv // tp, 1)
        qkv_rows = (nh // tp + 2 * kv_r) * d
        out: list[RawTensorSpec] = []
        if m.is_first_pp_rank(rank):
            out.append(("transformer.vocab_embedding.weight", (cfg["vocab_size"], H), dt))
        for local, _ in enumerate(m.pp_layers(cfg["num_hidden_layers"], m.pp_rank(rank))):
            p = f"transformer.layers.{local}."
            out += [
                (p + "input_layernorm.weight", (H,), dt),
                (p + "attention.qkv.weight", (qkv_rows, H), dt),
                (p + "attention.dense.weight", (H, nh * d // tp), dt),
                (p + "post_layernorm.weight", (H,), dt),
                (p + "mlp.fc.weight", (inter // tp, H), dt),
                (p + "mlp.gate.weight", (inter // tp, H), dt),
                (p + "mlp.proj.weight", (H, inter // tp), dt),
            ]
            if cfg.get("attn_bias"):
                out.append((p + "attention.qkv.bias", (qkv_rows,), dt))
                if cfg["architecture"] != "Qwen2ForCausalLM":
                    out.append((p + "attention.dense.bias", (H,), dt))
            if cfg.get("mlp_bias"):
                out += [
                    (p + "mlp.fc.bias", (inter // tp,), dt),
                    (p + "mlp.gate.bias", (inter // tp,), dt),
                    (p + "mlp.proj.bias", (H,), dt),
                ]
        if m.is_last_pp_rank(rank):
            out.append(("transformer.ln_f.weight", (H,), dt))
            out.append(("lm_head.weight", (pad_vocab(cfg["vocab_size"], tp) // tp, H), dt))
        return out

    # -- the weight table ----------------------------------------------------------------------
    def layer_table(self, cfg: dict, i: int) -> list[W]:
        a = f"model.layers.{i}.self_attn."
        mlp = f"model.layers.{i}.mlp."
        qwen = cfg["architecture"] == "Qwen2ForCausalLM"
        has_attn_bias = lambda c: bool(c.get("attn_bias"))  # noqa: E731
        has_dense_bias = lambda c: bool(c.get("attn_bias")) and not qwen  # noqa: E731
        has_mlp_bias = lambda c: bool(c.get("mlp_bias"))  # noqa: E731
        return [
            W("input_layernorm.weight", f"model.layers.{i}.input_layernorm.weight", replicate),
            W("attention.qkv.weight", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), qkv_separate),
            W("attention.qkv.bias", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), qkv_separate,
              when=has_attn_bias),
            W("attention.dense.weight", a + "o_proj.weight", row),
            W("attention.dense.bias", a + "o_proj.bias", replicate, when=has_dense_bias),
            W("post_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight", replicate),
            W("mlp.fc.weight", mlp + "gate_proj.weight", column),  # HF gate_proj is the activated branch
            W("mlp.gate.weight", mlp + "up_proj.weight", column),
            W("mlp.proj.weight", mlp + "down_proj.weight", row),
            W("mlp.fc.bias", mlp + "gate_proj.bias", column, when=has_mlp_bias),
            W("mlp.gate.bias", mlp + "up_proj.bias", column, when=has_mlp_bias),
            W("mlp.proj.bias", mlp + "down_proj.bias", replicate, when=has_mlp_bias),
        ]

    def global_table(self, cfg: dict, first: bool, last: bool, source: WeightSource) -> list[W]:
        out = []
        if first:
            out.append(W("transformer.vocab_embedding.weight", "model.embed_tokens.weight", replicate))
        if last:
            out.append(W("transformer.ln_f.weight", "model.norm.weight", replicate))
            head = "lm_head.weight"
            if cfg.get("tie_word_embeddings") or head not in source:
                if not cfg.get("tie_word_embeddings") and head not in source:
                    raise InvalidArgument(
                        "lm_head.weight is missing and tie_word_embeddings is false",
                        hint="the weights do not match config.json",
                    )
                head = "model.embed_tokens.weight"
            out.append(W("lm_head.weight", head, vocab_parallel))
        return out


LLAMA = LlamaFamily()

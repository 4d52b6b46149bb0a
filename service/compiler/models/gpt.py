"""GPT-2 (GPT2LMHeadModel -> GPTForCausalLM) and OPT (OPTForCausalLM) -> TensorRT-LLM checkpoint.

GPT-2 stores linears as Conv1D [in, out]: every weight is read transposed. Its c_attn is already
fused [Q; K; V]. Row-parallel biases (attention.dense, mlp.proj) are written whole on every rank.
OPT's learned position table carries a 2-row offset in HF (``embed_positions`` has max_pos + 2
rows); the checkpoint drops those rows so position p uses row p. ``ln_f`` exists only when
``do_layer_norm_before`` (pre-LN) is true.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..checkpoint.mapping import Mapping
from ..errors import UnsupportedArchitecture
from ..sources.weights import WeightSource
from .base import (
    RawTensorSpec,
    TableArch,
    W,
    column,
    offset_rows,
    pad_vocab,
    qkv_fused,
    qkv_separate,
    replicate,
    row,
    vocab_parallel,
)
from .hf_config import base_quantization
from .spec import MLP, Attention, Block, ModelSpec, Norm, activation

if TYPE_CHECKING:
    import torch

GPT_LAYOUT = "kiln-gpt-fused/1"
GPT_ARCHS = ("GPTForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM")
# engine layer tensors (kiln-gpt-fused/1) and the checkpoint tensors they are, one to one
LAYER_FIELDS = ("attn_norm", "attn_norm_bias", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm", "mlp_norm_bias",
                "fc", "fc_bias", "proj", "proj_bias")
_CKPT_FIELDS = ("input_layernorm.weight", "input_layernorm.bias", "attention.qkv.weight", "attention.qkv.bias",
                "attention.dense.weight", "attention.dense.bias", "post_layernorm.weight", "post_layernorm.bias",
                "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias")


def is_post_ln(cfg: dict) -> bool:
    """OPT with ``do_layer_norm_before`` false: x = ln1(x + attn(x)); x = ln2(x + mlp(x)); no ln_f."""
    return cfg.get("architecture") == "OPTForCausalLM" and not cfg.get("do_layer_norm_before", True)


def activation_name(cfg: dict) -> str:
    """The config's HF activation name (GPT-2: gelu_new, OPT: relu by default)."""
    act = cfg.get("hidden_act") or ("relu" if cfg.get("architecture") == "OPTForCausalLM" else "gelu_new")
    activation(act, act)  # unknown names raise
    return act


def block_specs(cfg: dict) -> ModelSpec:
    """Every layer: LayerNorm with bias (pre-LN, or OPT's post-LN), full attention without rope
    (learned absolute positions), biases on every linear, plain (ungated) MLP; final LayerNorm
    unless post-LN."""
    if cfg.get("position_embedding_type", "learned_absolute") != "learned_absolute":
        raise UnsupportedArchitecture(f"{cfg.get('architecture')} needs learned_absolute positions, "
                                      f"got {cfg.get('position_embedding_type')!r}")
    nh = int(cfg["num_attention_heads"])
    d = int(cfg.get("head_size") or int(cfg["hidden_size"]) // nh)
    norm = Norm("layernorm", float(cfg.get("norm_epsilon") or 1e-5), bias=True)
    attn = Attention("full", nh, int(cfg.get("num_key_value_heads") or nh), d, qkv_bias=True, o_bias=True)
    act = activation_name(cfg)
    mlp = MLP("plain", activation(act, act), bias=True, intermediate_size=int(cfg["intermediate_size"]))
    post = is_post_ln(cfg)
    return ModelSpec(cfg["architecture"], int(cfg["hidden_size"]), int(cfg["vocab_size"]),
                     (Block(attn, mlp, norm, "post" if post else "pre"),) * int(cfg["num_hidden_layers"]),
                     final_norm=None if post else norm, learned_positions=int(cfg["max_position_embeddings"]),
                     tied_head=bool(cfg.get("tie_word_embeddings", True)))


def engine_weight_map(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(engine tensor, checkpoint tensor), one to one, global layer indices (layout kiln-gpt-fused/1)."""
    spec = block_specs(cfg)
    table: list[tuple[str, tuple[str, ...]]] = [("embed", ("transformer.vocab_embedding.weight",)),
                                                ("pos_embed", ("transformer.position_embedding.weight",))]
    for i in range(len(spec.blocks)):
        p, e = f"transformer.layers.{i}.", f"layers.{i}."
        table += [(e + f, (p + c,)) for f, c in zip(LAYER_FIELDS, _CKPT_FIELDS, strict=True)]
    if spec.final_norm is not None:
        table += [("final_norm", ("transformer.ln_f.weight",)), ("final_norm_bias", ("transformer.ln_f.bias",))]
    return table + [("lm_head", ("lm_head.weight",))]


GELU_ACTS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu"}


def _common(cfg: dict, mapping: Mapping) -> dict:
    cfg["mapping"] = mapping.config_dict(cfg["num_hidden_layers"])
    cfg["quantization"] = base_quantization()
    cfg.update(
        position_embedding_type="learned_absolute",
        use_parallel_embedding=False,
        embedding_sharding_dim=0,
        bias=True,
        logits_dtype="float32",
    )
    return cfg


class GPTLike(TableArch):
    engine_layout = GPT_LAYOUT
    block_specs = staticmethod(block_specs)
    engine_weight_map = staticmethod(engine_weight_map)

    def has_ln_f(self, cfg: dict) -> bool:
        return True

    def tensor_specs(self, cfg: dict, rank: int, m: Mapping, dt: torch.dtype | str,
                     shapes_only: bool) -> list[RawTensorSpec]:
        tp = m.tp_size
        H, inter = cfg["hidden_size"], cfg["intermediate_size"]
        nh, d = cfg["num_attention_heads"], cfg["head_size"]
        qkv = 3 * nh * d // tp
        out: list[RawTensorSpec] = []
        if m.is_first_pp_rank(rank):
            out.append(("transformer.vocab_embedding.weight", (cfg["vocab_size"], H), dt))
            out.append(("transformer.position_embedding.weight", (cfg["max_position_embeddings"], H), dt))
        for local, _ in enumerate(m.pp_layers(cfg["num_hidden_layers"], m.pp_rank(rank))):
            p = f"transformer.layers.{local}."
            out += [
                (p + "input_layernorm.weight", (H,), dt), (p + "input_layernorm.bias", (H,), dt),
                (p + "attention.qkv.weight", (qkv, H), dt), (p + "attention.qkv.bias", (qkv,), dt),
                (p + "attention.dense.weight", (H, nh * d // tp), dt), (p + "attention.dense.bias", (H,), dt),
                (p + "post_layernorm.weight", (H,), dt), (p + "post_layernorm.bias", (H,), dt),
                (p + "mlp.fc.weight", (inter // tp, H), dt), (p + "mlp.fc.bias", (inter // tp,), dt),
                (p + "mlp.proj.weight", (H, inter // tp), dt), (p + "mlp.proj.bias", (H,), dt),
            ]
        if m.is_last_pp_rank(rank):
            if self.has_ln_f(cfg):
                out += [("transformer.ln_f.weight", (H,), dt), ("transformer.ln_f.bias", (H,), dt)]
            out.append(("lm_head.weight", (pad_vocab(cfg["vocab_size"], tp) // tp, H), dt))
        return out


class GPT2(GPTLike):
    hf_architectures = ("GPT2LMHeadModel",)
    trt_architectures = ("GPTForCausalLM", "GPT2LMHeadModel")
    hf_prefix_aliases = (("transformer.", ""),)

    def trt_config(self, hf: dict, dtype: str, mapping: Mapping) -> dict:
        H, nh = int(hf["n_embd"]), int(hf["n_head"])
        act = hf.get("activation_function", "gelu_new")
        if act not in GELU_ACTS:
            raise UnsupportedArchitecture(f"GPT-2 activation {act!r} is not supported")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise UnsupportedArchitecture(
                "GPT-2 variants with scale_attn_by_inverse_layer_idx or without scale_attn_weights are not supported"
            )
        cfg = {
            "architecture": "GPTForCausalLM",
            "gpt_variant": "gpt2",
            "dtype": dtype,
            "vocab_size": int(hf["vocab_size"]),
            "max_position_embeddings": int(hf.get("n_positions", 1024)),
            "hidden_size": H,
            "num_hidden_layers": int(hf["n_layer"]),
            "num_attention_heads": nh,
            "num_key_value_heads": nh,
            "head_size": H // nh,
            "intermediate_size": int(hf.get("n_inner") or 4 * H),
            "hidden_act": act,
            "norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
            "q_scaling": 1.0,
        }
        return _common(cfg, mapping)

    def layer_table(self, cfg: dict, i: int) -> list[W]:
        h = f"transformer.h.{i}."
        return [
            W("input_layernorm.weight", h + "ln_1.weight", replicate),
            W("input_layernorm.bias", h + "ln_1.bias", replicate),
            W("attention.qkv.weight", h + "attn.c_attn.weight", qkv_fused, transpose=True),
            W("attention.qkv.bias", h + "attn.c_attn.bias", qkv_fused),
            W("attention.dense.weight", h + "attn.c_proj.weight", row, transpose=True),
            W("attention.dense.bias", h + "attn.c_proj.bias", replicate),
            W("post_layernorm.weight", h + "ln_2.weight", replicate),
            W("post_layernorm.bias", h + "ln_2.bias", replicate),
            W("mlp.fc.weight", h + "mlp.c_fc.weight", column, transpose=True),
            W("mlp.fc.bias", h + "mlp.c_fc.bias", column),
            W("mlp.proj.weight", h + "mlp.c_proj.weight", row, transpose=True),
            W("mlp.proj.bias", h + "mlp.c_proj.bias", replicate),
        ]

    def global_table(self, cfg: dict, first: bool, last: bool, source: WeightSource) -> list[W]:
        out = []
        if first:
            out += [
                W("transformer.vocab_embedding.weight", "transformer.wte.weight", replicate),
                W("transformer.position_embedding.weight", "transformer.wpe.weight", replicate),
            ]
        if last:
            out += [
                W("transformer.ln_f.weight", "transformer.ln_f.weight", replicate),
                W("transformer.ln_f.bias", "transformer.ln_f.bias", replicate),
            ]
            tied = cfg.get("tie_word_embeddings", True) or "lm_head.weight" not in source
            out.append(W("lm_head.weight", "transformer.wte.weight" if tied else "lm_head.weight", vocab_parallel))
        return out


class OPT(GPTLike):
    hf_architectures = ("OPTForCausalLM",)
    trt_architectures = ("OPTForCausalLM",)
    hf_prefix_aliases = (("model.decoder.", "decoder."),)

    def trt_config(self, hf: dict, dtype: str, mapping: Mapping) -> dict:
        H, nh = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if int(hf.get("word_embed_proj_dim", H)) != H:
            raise UnsupportedArchitecture(
                f"OPT with word_embed_proj_dim={hf.get('word_embed_proj_dim')} != hidden_size={H} "
                "(project_in/project_out) is not supported"
            )
        if hf.get("enable_bias", True) is False or hf.get("layer_norm_elementwise_affine", True) is False:
            raise UnsupportedArchitecture("OPT without biases or affine layer norms is not supported")
        if hf.get("_remove_final_layer_norm"):
            raise UnsupportedArchitecture("OPT with _remove_final_layer_norm is not supported")
        act = hf.get("activation_function", "relu")
        if act not in GELU_ACTS:
            raise UnsupportedArchitecture(f"OPT activation {act!r} is not supported")
        cfg = {
            "architecture": "OPTForCausalLM",
            "dtype": dtype,
            "vocab_size": int(hf["vocab_size"]),
            "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
            "hidden_size": H,
            "num_hidden_layers": int(hf["num_hidden_layers"]),
            "num_attention_heads": nh,
            "num_key_value_heads": nh,
            "head_size": H // nh,
            "intermediate_size": int(hf["ffn_dim"]),
            "hidden_act": act,
            "norm_epsilon": 1e-5,
            "do_layer_norm_before": bool(hf.get("do_layer_norm_before", True)),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        }
        return _common(cfg, mapping)

    def has_ln_f(self, cfg: dict) -> bool:
        return bool(cfg.get("do_layer_norm_before", True))

    def layer_table(self, cfg: dict, i: int) -> list[W]:
        h = f"model.decoder.layers.{i}."
        a = h + "self_attn."
        return [
            W("input_layernorm.weight", h + "self_attn_layer_norm.weight", replicate),
            W("input_layernorm.bias", h + "self_attn_layer_norm.bias", replicate),
            W("attention.qkv.weight", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), qkv_separate),
            W("attention.qkv.bias", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), qkv_separate),
            W("attention.dense.weight", a + "out_proj.weight", row),
            W("attention.dense.bias", a + "out_proj.bias", replicate),
            W("post_layernorm.weight", h + "final_layer_norm.weight", replicate),
            W("post_layernorm.bias", h + "final_layer_norm.bias", replicate),
            W("mlp.fc.weight", h + "fc1.weight", column),
            W("mlp.fc.bias", h + "fc1.bias", column),
            W("mlp.proj.weight", h + "fc2.weight", row),
            W("mlp.proj.bias", h + "fc2.bias", replicate),
        ]

    def global_table(self, cfg: dict, first: bool, last: bool, source: WeightSource) -> list[W]:
        out = []
        if first:
            out += [
                W("transformer.vocab_embedding.weight", "model.decoder.embed_tokens.weight", replicate),
                # HF OPT positions are offset by 2 rows; drop them so row p is position p.
                W("transformer.position_embedding.weight", "model.decoder.embed_positions.weight", offset_rows(2)),
            ]
        if last:
            if self.has_ln_f(cfg):
                out += [
                    W("transformer.ln_f.weight", "model.decoder.final_layer_norm.weight", replicate),
                    W("transformer.ln_f.bias", "model.decoder.final_layer_norm.bias", replicate),
                ]
            tied = cfg.get("tie_word_embeddings", True) or "lm_head.weight" not in source
            head = "model.decoder.embed_tokens.weight" if tied else "lm_head.weight"
            out.append(W("lm_head.weight", head, vocab_parallel))
        return out


GPT2_SPEC = GPT2()
OPT_SPEC = OPT()

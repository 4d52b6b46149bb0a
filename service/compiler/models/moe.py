"""Mixture-of-Experts families (MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM) ->
TensorRT-LLM checkpoint, as TensorRT-LLM's llama (Mixtral) and qwen (Qwen2/3-MoE) converters write them
(``docs/reference/families.md``, "Mixture of Experts").

Per layer, besides the Llama-style attention and norms (Qwen2-MoE: q/k/v bias; Qwen3-MoE: per-head
``attention.q_layernorm`` / ``k_layernorm``):

* ``mlp.router.weight`` [E, H], float32 whatever the dtype, replicated, never quantized;
* ``mlp.fc.weight`` [E_r, 2 x I_r, H]: the rank's experts stacked, each expert's rows
  [up (w3) slice; gate (w1) slice] (TensorRT-LLM's ``w3w1``, the activated branch second);
* ``mlp.proj.weight`` [E_r, H, I_r] (down, w2), the intermediate dim split like a row-parallel linear;
* Qwen2-MoE: ``mlp.shared_expert.fc.weight`` [2 x Is/T, H] = [up_r; gate_r], ``mlp.shared_expert.proj.weight``
  [H, Is/T] and ``mlp.shared_expert_gate.weight`` [1, H] (model dtype, replicated).

E_r = E / moe_ep_size experts (the contiguous range of the rank's moe_ep_rank), I_r = I / moe_tp_size
(slice moe_tp_rank), with tp_size = moe_tp_size x moe_ep_size (``checkpoint/mapping.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..checkpoint.mapping import Mapping
from ..errors import UnsupportedArchitecture
from ..sources.weights import SourceTensor, WeightSource
from .base import (
    TORCH_DTYPES,
    Piece,
    RawTensorSpec,
    SplitContext,
    TensorPlan,
    W,
    block,
    check_attention_split,
    check_divisible,
    column,
    pad_vocab,
    replicate,
    row,
)
from .llama import LLAMA, LlamaFamily
from .spec import MLP, Attention, Block, ModelSpec, Norm, rope_of

if TYPE_CHECKING:
    import torch

MOE_LAYOUT = "kiln-moe-fused/1"
MIXTRAL, QWEN2_MOE, QWEN3_MOE = "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"
# TensorRT-LLM's MoeConfig.ExpertScaleNormalizationMode
NORM_NONE, NORM_RENORMALIZE = 0, 1


def moe_settings(cfg: dict) -> tuple[int, int, int, int, bool]:
    """(experts, top_k, expert intermediate size, shared expert intermediate size, renormalize) of a
    checkpoint config."""
    moe = cfg.get("moe")
    if not isinstance(moe, dict):
        raise UnsupportedArchitecture(f"config.json: {cfg.get('architecture')} needs a 'moe' object")
    experts, top_k = int(moe.get("num_experts") or 0), int(moe.get("top_k") or 0)
    inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    shared = int(cfg.get("moe_shared_expert_intermediate_size") or moe.get("shared_expert_intermediate_size") or 0)
    mode = int(moe.get("normalization_mode", NORM_RENORMALIZE))
    if mode not in (NORM_NONE, NORM_RENORMALIZE):
        raise UnsupportedArchitecture(f"config.json: moe.normalization_mode {mode} is not supported",
                                      hint="supported: 0 (none), 1 (renormalize)")
    return experts, top_k, inter, shared, mode == NORM_RENORMALIZE


def block_specs(cfg: dict) -> ModelSpec:
    """Every layer: RMSNorm pre-norm, full GQA attention with GPT-NeoX rope (Qwen2-MoE: qkv bias,
    Qwen3-MoE: q/k RMSNorm), a Mixture-of-Experts MLP of silu experts; final RMSNorm."""
    arch = cfg["architecture"]
    nh = int(cfg["num_attention_heads"])
    d = int(cfg.get("head_size") or int(cfg["hidden_size"]) // nh)
    norm = Norm("rms", float(cfg.get("norm_epsilon") or 1e-6))
    attn = Attention("full", nh, int(cfg.get("num_key_value_heads") or nh), d, qkv_bias=bool(cfg.get("attn_bias")),
                     rope=rope_of(cfg, d), qk_norm=norm if arch == QWEN3_MOE else None)
    experts, top_k, inter, shared, renorm = moe_settings(cfg)
    mlp = MLP("moe", "silu", intermediate_size=inter, num_experts=experts, top_k=top_k, renormalize=renorm,
              shared_size=shared)
    return ModelSpec(arch, int(cfg["hidden_size"]), int(cfg["vocab_size"]),
                     (Block(attn, mlp, norm),) * int(cfg["num_hidden_layers"]), final_norm=norm,
                     tied_head=bool(cfg.get("tie_word_embeddings")))


def engine_weight_map(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(engine tensor, checkpoint tensors), global layer indices: the stacked experts as stored
    (``experts_gate_up`` = ``mlp.fc``, each expert [up; gate]), the router, the shared expert."""
    spec = block_specs(cfg)
    table: list[tuple[str, tuple[str, ...]]] = [("embed", ("transformer.vocab_embedding.weight",))]
    for i, b in enumerate(spec.blocks):
        p, e = f"transformer.layers.{i}.", f"layers.{i}."
        table += [(e + "attn_norm", (p + "input_layernorm.weight",)), (e + "qkv", (p + "attention.qkv.weight",)),
                  (e + "o", (p + "attention.dense.weight",)), (e + "mlp_norm", (p + "post_layernorm.weight",)),
                  (e + "router", (p + "mlp.router.weight",)), (e + "experts_gate_up", (p + "mlp.fc.weight",)),
                  (e + "experts_down", (p + "mlp.proj.weight",))]
        table += [(e + "qkv_bias", (p + "attention.qkv.bias",))] if b.attention.qkv_bias else []
        if b.attention.qk_norm is not None:
            table += [(e + "q_norm", (p + "attention.q_layernorm.weight",)),
                      (e + "k_norm", (p + "attention.k_layernorm.weight",))]
        if b.mlp.shared_size:
            table += [(e + "shared_gate_up", (p + "mlp.shared_expert.fc.weight",)),
                      (e + "shared_down", (p + "mlp.shared_expert.proj.weight",)),
                      (e + "shared_gate", (p + "mlp.shared_expert_gate.weight",))]
    return table + [("final_norm", ("transformer.ln_f.weight",)), ("lm_head", ("lm_head.weight",))]


def _expert_rules(mapping: Mapping, experts: int):
    """Split rules of the stacked experts for a checkpoint's mapping (the rank from ctx.tp_rank)."""
    ep, mtp = mapping.moe_ep, mapping.moe_tp

    def held(ctx: SplitContext) -> tuple[range, int]:
        per = experts // ep
        e0 = (ctx.tp_rank % ep) * per
        return range(e0, e0 + per), ctx.tp_rank // ep

    def fc(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
        """src: up_0, gate_0, up_1, gate_1, ...; per held expert [up slice; gate slice]."""
        rng, mt = held(ctx)
        out = []
        for e in rng:
            for s in (src[2 * e], src[2 * e + 1]):
                n = s.shape[0] // mtp
                out.append(block(s, mt * n, (mt + 1) * n, transpose=t))
        return out

    def proj(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
        rng, mt = held(ctx)
        out = []
        for e in rng:
            n = src[e].shape[1] // mtp
            out.append(block(src[e], 0, src[e].shape[0], mt * n, (mt + 1) * n, transpose=t))
        return out

    return fc, proj


def _shared_fc(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
    """Qwen2-MoE shared expert: [up_r; gate_r] (each column-split)."""
    return column(ctx, src[:1], t) + column(ctx, src[1:], t)


class MoEFamily(LlamaFamily):
    hf_architectures = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)
    trt_architectures = hf_architectures
    engine_layout = MOE_LAYOUT
    block_specs = staticmethod(block_specs)
    engine_weight_map = staticmethod(engine_weight_map)

    def trt_config(self, hf: dict, dtype: str, mapping: Mapping) -> dict:
        arch = hf["architectures"][0]
        mixtral = arch == MIXTRAL
        if not mixtral and (int(hf.get("decoder_sparse_step", 1)) != 1 or hf.get("mlp_only_layers")):
            raise UnsupportedArchitecture(f"{arch} with dense layers (decoder_sparse_step != 1 or mlp_only_layers) "
                                          "is not supported", hint="every layer must be a Mixture-of-Experts layer")
        if hf.get("use_sliding_window") or (mixtral and hf.get("sliding_window")):
            raise UnsupportedArchitecture(f"{arch} with sliding-window attention is not supported")
        # Mixtral: num_local_experts; Qwen: num_experts (transformers 5 writes num_local_experts for Qwen3-MoE)
        experts = int((hf.get("num_local_experts") if mixtral else hf.get("num_experts") or hf.get("num_local_experts"))
                      or 0)
        top_k = int(hf.get("num_experts_per_tok") or 0)
        if experts < 2 or not 0 < top_k <= experts:
            raise UnsupportedArchitecture(f"{arch} with {experts} experts and num_experts_per_tok={top_k} is not "
                                          "a Mixture-of-Experts model Kiln can convert")
        cfg = LLAMA.trt_config({**hf, "architectures": ["LlamaForCausalLM"]}, dtype, mapping)
        cfg["architecture"] = arch
        cfg["hidden_act"] = "swiglu"  # TensorRT-LLM's MoE names the gated activation explicitly
        shared = 0 if mixtral else int(hf.get("shared_expert_intermediate_size") or 0)
        if arch == QWEN3_MOE:
            shared = 0  # Qwen3-MoE has no shared expert (its config may still carry the key)
        # Mixtral always renormalizes its top-k weights; Qwen2/3-MoE do when norm_topk_prob
        renorm = mixtral or bool(hf.get("norm_topk_prob", False))
        cfg["moe"] = {"num_experts": experts, "shared_expert_intermediate_size": shared, "top_k": top_k,
                      "normalization_mode": NORM_RENORMALIZE if renorm else NORM_NONE,
                      "sparse_mixer_epsilon": 0.01, "tp_mode": 0, "device_limited_n_group": 0,
                      "device_limited_topk_group": 0, "device_limited_routed_scaling_factor": 1.0}
        if not mixtral:
            cfg["qwen_type"] = "qwen2_moe" if arch == QWEN2_MOE else "qwen3_moe"
            cfg["moe_intermediate_size"] = int(hf["moe_intermediate_size"])
            cfg["moe_shared_expert_intermediate_size"] = shared
            # Qwen2-MoE: q/k/v biases (transformers' qkv_bias, true when absent); Qwen3-MoE: none
            cfg["attn_bias"] = bool(hf.get("qkv_bias", True)) if arch == QWEN2_MOE else bool(hf.get("attention_bias"))
            cfg["qk_layernorm"] = arch == QWEN3_MOE
        m = Mapping(tp_size=mapping.tp_size, pp_size=mapping.pp_size, layers_per_stage=mapping.layers_per_stage,
                    moe_tp_size=mapping.moe_tp, moe_ep_size=mapping.moe_ep)
        cfg["mapping"] = m.config_dict(cfg["num_hidden_layers"])
        return cfg

    def check_mapping(self, cfg: dict, mapping: Mapping) -> None:
        check_attention_split(cfg["num_attention_heads"], cfg["num_key_value_heads"], mapping.tp_size)
        experts, _, inter, shared, _ = moe_settings(cfg)
        check_divisible("num_experts", experts, "moe_ep_size", mapping.moe_ep,
                        hint="choose a moe_ep_size that divides the number of experts")
        check_divisible("expert intermediate_size", inter, "moe_tp_size", mapping.moe_tp)
        check_divisible("shared_expert_intermediate_size", shared, "tp_size", mapping.tp_size)
        mapping.stage_sizes(cfg["num_hidden_layers"])

    # -- the spec: names, shapes and dtypes per rank, from config.json alone --------------------
    def tensor_specs(self, cfg: dict, rank: int, m: Mapping, dt: torch.dtype | str,
                     shapes_only: bool) -> list[RawTensorSpec]:
        f32 = dt if shapes_only else TORCH_DTYPES["float32"]  # the router (float32 unless only shapes are asked)
        tp, ep, mtp = m.tp_size, m.moe_ep, m.moe_tp
        H, nh, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_size"]
        nkv = cfg.get("num_key_value_heads") or nh
        experts, _, inter, shared, _ = moe_settings(cfg)
        qkv_rows = (nh // tp + 2 * max(nkv // tp, 1)) * d
        out: list[RawTensorSpec] = []
        if m.is_first_pp_rank(rank):
            out.append(("transformer.vocab_embedding.weight", (cfg["vocab_size"], H), dt))
        for local, _ in enumerate(m.pp_layers(cfg["num_hidden_layers"], m.pp_rank(rank))):
            p = f"transformer.layers.{local}."
            out += [(p + "input_layernorm.weight", (H,), dt), (p + "attention.qkv.weight", (qkv_rows, H), dt),
                    (p + "attention.dense.weight", (H, nh * d // tp), dt), (p + "post_layernorm.weight", (H,), dt),
                    (p + "mlp.router.weight", (experts, H), f32),
                    (p + "mlp.fc.weight", (experts // ep, 2 * inter // mtp, H), dt),
                    (p + "mlp.proj.weight", (experts // ep, H, inter // mtp), dt)]
            if cfg.get("attn_bias"):
                out.append((p + "attention.qkv.bias", (qkv_rows,), dt))
            if cfg["architecture"] == QWEN3_MOE:
                out += [(p + "attention.q_layernorm.weight", (d,), dt), (p + "attention.k_layernorm.weight", (d,), dt)]
            if shared:
                out += [(p + "mlp.shared_expert.fc.weight", (2 * shared // tp, H), dt),
                        (p + "mlp.shared_expert.proj.weight", (H, shared // tp), dt),
                        (p + "mlp.shared_expert_gate.weight", (1, H), dt)]
        if m.is_last_pp_rank(rank):
            out.append(("transformer.ln_f.weight", (H,), dt))
            out.append(("lm_head.weight", (pad_vocab(cfg["vocab_size"], tp) // tp, H), dt))
        return out

    # -- the weight table ----------------------------------------------------------------------
    def layer_table(self, cfg: dict, i: int) -> list[W]:
        arch = cfg["architecture"]
        attn = [w for w in super().layer_table({**cfg, "mlp_bias": False}, i)
                if not w.trt.startswith("mlp.") and w.trt != "attention.dense.bias"]  # no o_proj bias in any MoE
        a = f"model.layers.{i}.self_attn."
        if arch == QWEN3_MOE:
            attn += [W("attention.q_layernorm.weight", a + "q_norm.weight", replicate),
                     W("attention.k_layernorm.weight", a + "k_norm.weight", replicate)]
        experts, _, _, shared, _ = moe_settings(cfg)
        fc, proj = _expert_rules(Mapping.from_dict(cfg["mapping"]), experts)
        if arch == MIXTRAL:
            mp = f"model.layers.{i}.block_sparse_moe."
            up, gate, down, router = "w3", "w1", "w2", mp + "gate.weight"
        else:
            mp = f"model.layers.{i}.mlp."
            up, gate, down, router = "up_proj", "gate_proj", "down_proj", mp + "gate.weight"
        ex = mp + "experts.{}.{}.weight"
        moe = [W("mlp.router.weight", router, replicate),
               W("mlp.fc.weight", tuple(ex.format(e, n) for e in range(experts) for n in (up, gate)), fc),
               W("mlp.proj.weight", tuple(ex.format(e, down) for e in range(experts)), proj)]
        if shared:
            s = mp + "shared_expert."
            moe += [W("mlp.shared_expert.fc.weight", (s + "up_proj.weight", s + "gate_proj.weight"), _shared_fc),
                    W("mlp.shared_expert.proj.weight", s + "down_proj.weight", row),
                    W("mlp.shared_expert_gate.weight", mp + "shared_expert_gate.weight", replicate)]
        return attn + moe

    def _plan_entry(self, w: W, trt_name: str, ctx: SplitContext, dtype: torch.dtype | str,
                    source: WeightSource) -> TensorPlan:
        if w.trt == "mlp.router.weight":  # float32 whatever the checkpoint dtype (TensorRT-LLM's router)
            dtype = source.output_dtype("float32")
        plan = super()._plan_entry(w, trt_name, ctx, dtype, source)
        if w.trt == "mlp.fc.weight":  # rows of the held experts, each [up; gate] -> [E_r, 2 x I_r, H]
            e_r = len(plan.pieces) // 2
            plan.shape = (e_r, plan.shape[0] // max(e_r, 1), plan.shape[1])
        elif w.trt == "mlp.proj.weight":  # [E_r x H, I_r] -> [E_r, H, I_r]
            e_r = len(plan.pieces)
            plan.shape = (e_r, plan.shape[0] // max(e_r, 1), plan.shape[1])
        return plan


MOE = MoEFamily()

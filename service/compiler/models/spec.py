"""A decoder described by data: the per-layer block spec both runtimes execute.

Each family module (``llama.py``, ``qwen3.py``, ``gemma.py``, ``gpt.py``, ``nemotron_nas.py``, ``phi3.py``) declares
``block_specs(cfg) -> ModelSpec`` from its TensorRT-LLM checkpoint config, and its engine weight map
(``engine_weight_map(cfg)``: engine tensor <- checkpoint tensors concatenated along dim 0). The torch
engine (``engine/model.py``) resolves a ``ModelSpec`` into its step functions once, at load; the
reference (``reference/model.py``) runs the same spec in plain float PyTorch. A new dense family is a
spec plus its weight map.

Checkpoint module names per block (what the reference reads, TensorRT-LLM's names):
``Block.norm_names`` = (pre-attention, pre-MLP, post-attention, post-MLP) norms, by default
``input_layernorm`` / ``post_layernorm`` / ``post_attention_layernorm`` / ``post_feedforward_layernorm``
(TensorRT-LLM's Gemma 2 / 3: ``input_layernorm`` / ``pre_feedforward_layernorm`` / ``post_layernorm`` /
``post_feedforward_layernorm``), ``attention.qkv`` / ``attention.dense``
(``attention`` itself for a linear replacement), ``attention.q_layernorm`` / ``k_layernorm`` (qk-norm),
``{mlp_module}.fc`` (the activated branch) / ``.gate`` (the multiplied one) / ``.proj`` (``{mlp_module}``
itself for a linear replacement); a Mixture-of-Experts MLP (``models/moe.py``): ``.router`` (float32
[experts, H]), ``.fc`` (stacked [experts, 2 x I, H], each expert's rows [up; gate]: the activated
branch second, TensorRT-LLM's ``w3w1``), ``.proj`` ([experts, H, I]), and for a shared expert
``.shared_expert.fc`` ([up; gate]) / ``.shared_expert.proj`` and ``.shared_expert_gate`` ([1, H]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedArchitecture

NORM_KINDS = ("rms", "rms_1p", "layernorm")  # rms_1p: Gemma's (1 + w) scale
PLACEMENTS = ("pre", "post", "sandwich")  # post: OPT post-LN; sandwich: pre + post norms (Gemma 2/3)
ATTENTION_KINDS = ("full", "sliding", "linear", "none")
MLP_KINDS = ("gated", "plain", "linear", "none", "moe")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu")  # swiglu: plain MLPs only (silu(x[I:]) * x[:I])
# HF / TensorRT-LLM activation names -> ours (gelu_new, gelu_pytorch_tanh, gelu_fast: the tanh form)
ACTIVATION_NAMES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                    "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
ROPE_SCALINGS = (None, "linear", "llama3", "longrope")
NOT_YET: dict[str, str] = {}  # kinds the vocabulary names that no runtime executes yet
# checkpoint norm modules of a block: before attention, before the MLP, after attention, after the MLP
NORM_NAMES = ("input_layernorm", "post_layernorm", "post_attention_layernorm", "post_feedforward_layernorm")
# TensorRT-LLM's Gemma 2 / 3 names (models/gemma/model.py): post_layernorm normalizes the attention output
SANDWICH_NORM_NAMES = ("input_layernorm", "pre_feedforward_layernorm", "post_layernorm", "post_feedforward_layernorm")


@dataclass(frozen=True)
class Norm:
    kind: str = "rms"
    eps: float = 1e-6
    bias: bool = False  # layernorm only


@dataclass(frozen=True)
class Rope:
    """GPT-NeoX rotary over the first ``dim`` dims of each head; ``scaling`` as TensorRT-LLM's
    ``rotary_scaling`` (a tuple of items, so the spec stays hashable)."""

    dim: int
    base: float = 10000.0
    scaling: tuple[tuple[str, object], ...] | None = None

    @property
    def scaling_dict(self) -> dict | None:
        return dict(self.scaling) if self.scaling else None


@dataclass(frozen=True)
class Attention:
    kind: str = "full"
    num_heads: int = 0
    num_kv_heads: int = 0
    head_size: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    rope: Rope | None = None  # None: no rotary (learned positions, or none)
    qk_norm: Norm | None = None  # per-head norm of q and k before rope (Qwen3, Gemma 3)
    softcap: float | None = None  # tanh soft-cap of the attention logits (Gemma 2)
    scale: float | None = None  # None: 1 / sqrt(head_size)
    window: int | None = None  # sliding: each query sees the last ``window`` positions


@dataclass(frozen=True)
class MLP:
    kind: str = "gated"
    act: str = "silu"
    bias: bool = False
    intermediate_size: int = 0  # moe: each expert's
    # moe only: experts, experts per token (softmax over all experts, top-k, then renormalize the k
    # weights to sum 1 when ``renormalize``), and a shared expert of ``shared_size`` (0: none) scaled by
    # sigmoid(shared_expert_gate(x)) (Qwen2-MoE)
    num_experts: int = 0
    top_k: int = 0
    renormalize: bool = True
    shared_size: int = 0


@dataclass(frozen=True)
class Block:
    attention: Attention
    mlp: MLP
    norm: Norm
    placement: str = "pre"
    mlp_module: str = "mlp"  # checkpoint module of the MLP (DeciLM: ffn)
    norm_names: tuple[str, str, str, str] = NORM_NAMES  # checkpoint modules: pre-attn, pre-MLP, post-attn, post-MLP


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    hidden_size: int
    vocab_size: int
    blocks: tuple[Block, ...]
    final_norm: Norm | None = None  # None: no ln_f (OPT post-LN)
    learned_positions: int = 0  # rows of a learned absolute position table (GPT-2 / OPT), 0 = none
    embedding_scale: float | None = None  # Gemma: sqrt(hidden_size)
    final_softcap: float | None = None  # Gemma 2
    tied_head: bool = False  # informational: the checkpoint always carries lm_head.weight
    extras: dict = field(default_factory=dict, compare=False, hash=False)

    def check(self, what: str = "Kiln") -> ModelSpec:
        """Refuse a spec with a kind nobody executes (or executes yet), before anything is built."""
        for i, b in enumerate(self.blocks):
            a, m = b.attention, b.mlp
            for value, allowed, name in ((b.norm.kind, NORM_KINDS, "norm"), (b.placement, PLACEMENTS, "placement"),
                                         (a.kind, ATTENTION_KINDS, "attention"), (m.kind, MLP_KINDS, "mlp")):
                if value not in allowed:
                    raise UnsupportedArchitecture(f"layer {i}: {name} kind {value!r} is not known to {what}",
                                                  hint=f"known: {', '.join(allowed)}")
            if m.kind in NOT_YET:
                raise UnsupportedArchitecture(f"{self.architecture} layer {i}: {NOT_YET[m.kind]} by {what}")
            if m.kind == "moe" and not (m.num_experts > 1 and 0 < m.top_k <= m.num_experts and m.act == "silu"
                                        and m.intermediate_size > 0 and not m.bias):
                raise UnsupportedArchitecture(
                    f"layer {i}: a Mixture-of-Experts MLP needs num_experts > 1, 0 < top_k <= num_experts, "
                    f"silu experts without bias (got {m.num_experts} experts, top_k {m.top_k}, {m.act!r})")
            if m.kind in ("gated", "plain") and m.act not in ACTIVATIONS:
                raise UnsupportedArchitecture(f"layer {i}: activation {m.act!r} is not supported",
                                              hint=f"supported: {', '.join(ACTIVATIONS)}")
            if m.act == "swiglu" and m.kind != "plain":
                raise UnsupportedArchitecture(f"layer {i}: swiglu acts on a plain MLP's fused [up; gate] fc")
            if a.kind in ("full", "sliding"):
                if a.num_heads < 1 or a.num_kv_heads < 1 or a.num_heads % a.num_kv_heads:
                    raise UnsupportedArchitecture(f"layer {i}: {a.num_heads} heads over {a.num_kv_heads} KV heads")
                if a.kind == "sliding" and not (a.window and a.window > 0):
                    raise UnsupportedArchitecture(f"layer {i}: sliding attention needs a window")
                if a.rope is not None:
                    kind = (a.rope.scaling_dict or {}).get("rope_type", (a.rope.scaling_dict or {}).get("type"))
                    if kind not in (*ROPE_SCALINGS, "default"):
                        raise UnsupportedArchitecture(f"rope scaling {kind!r} is not supported",
                                                      hint="supported: linear, llama3, longrope")
                    if a.rope.dim % 2 or a.rope.dim > a.head_size:
                        raise UnsupportedArchitecture(f"layer {i}: rotary dim {a.rope.dim} for head_size {a.head_size}")
        return self

    @property
    def attention_layers(self) -> list[int]:
        """Layers that keep a KV cache."""
        return [i for i, b in enumerate(self.blocks) if b.attention.kind in ("full", "sliding")]


def activation(name: str | None, default: str) -> str:
    """A config's ``hidden_act`` as one of ACTIVATIONS (unknown names raise)."""
    name = name or default
    if name not in ACTIVATION_NAMES:
        raise UnsupportedArchitecture(f"hidden_act {name!r} is not supported",
                                      hint=f"supported: {', '.join(ACTIVATION_NAMES)}")
    return ACTIVATION_NAMES[name]


def rope_of(cfg: dict, head_size: int) -> Rope:
    """GPT-NeoX rotary of a TensorRT-LLM config (``rotary_base``, ``rotary_scaling``,
    ``rotary_embedding_dim``)."""
    sc = cfg.get("rotary_scaling") or None
    if sc is not None and not isinstance(sc, dict):
        raise UnsupportedArchitecture(f"config.json: rotary_scaling must be an object or null, got {sc!r}")
    return Rope(dim=int(cfg.get("rotary_embedding_dim") or head_size), base=float(cfg.get("rotary_base") or 10000.0),
                scaling=tuple(sorted(sc.items())) if sc else None)

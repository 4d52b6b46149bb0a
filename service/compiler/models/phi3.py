"""Phi-3 / Phi-3.5 / Phi-4 (Phi3ForCausalLM) -> TensorRT-LLM checkpoint, block spec and engine weight map.

Layout as TensorRT-LLM's phi3 converter writes it (``tensorrt_llm/models/phi3/{config,convert}.py``;
facts and citations in ``docs/reference/families.md``): the HF checkpoint's fused ``qkv_proj`` ([Q; K; V])
becomes ``attention.qkv`` and its fused ``gate_up_proj`` ([gate; up]) becomes one ``mlp.fc`` with the
halves swapped ([up; gate]) under ``hidden_act: swiglu`` (TensorRT-LLM's ``swiglu(x) = silu(x[I:]) *
x[:I]``), ``down_proj`` -> ``mlp.proj``, ``o_proj`` -> ``attention.dense``. Per tensor-parallel rank the
split is taken from the heads and the halves, not from the fused rows: rank r holds [Q_r; K_r; V_r] (KV
heads repeated below tp, as the Llama family) and [up_r; gate_r].

``longrope`` (``su``) scaling is written as TensorRT-LLM's keys: ``position_embedding_type: long_rope``,
``longrope_scaling_short_factors`` / ``_long_factors`` and ``original_max_position_embeddings``;
``rotary_pct`` carries ``partial_rotary_factor``. The runtimes follow transformers: the short factors
while the sequence is at most ``original_max_position_embeddings`` long, the long ones beyond, cos/sin
scaled by sqrt(1 + ln(max_pos / original) / ln(original)) throughout (``longrope_tables``), and greedy
generation recomputes the cache once when the sequence first passes the original length, as
transformers' Phi-3 ``generate()`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..checkpoint.mapping import Mapping
from ..errors import InvalidArgument, UnsupportedArchitecture, WeightsMismatch
from ..sources.weights import SourceTensor, WeightSource
from .base import (
    Piece,
    RawTensorSpec,
    SplitContext,
    TableArch,
    W,
    block,
    oriented_shape,
    pad_vocab,
    qkv_fused,
    replicate,
    row,
    vocab_parallel,
)
from .hf_config import base_quantization
from .spec import MLP, Attention, Block, ModelSpec, Norm, Rope

if TYPE_CHECKING:
    import torch

PHI3_ARCH = "Phi3ForCausalLM"
PHI3_LAYOUT = "kiln-phi3-fused/1"
LONGROPE_NAMES = ("longrope", "su")  # "su": the name of the first Phi-3-128k configs


def swiglu_halves(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
    """HF ``gate_up_proj`` [gate; up] -> rank r's ``mlp.fc`` [up_r; gate_r] (TensorRT-LLM's swiglu order)."""
    (s,) = src
    rows = oriented_shape(s, t)[0]
    if rows % (2 * ctx.tp_size):
        raise WeightsMismatch(f"tensor {s.name!r} has {rows} rows: not two halves divisible by tp_size={ctx.tp_size}")
    inter, n = rows // 2, rows // 2 // ctx.tp_size
    r = ctx.tp_rank
    return [block(s, inter + r * n, inter + (r + 1) * n, transpose=t), block(s, r * n, (r + 1) * n, transpose=t)]


def _rope_params(hf: dict) -> tuple[float, dict | None, float]:
    """(rope_theta, the longrope dict or None, partial_rotary_factor) of a transformers 4.x or 5.x config."""
    params: dict = hf["rope_parameters"] if isinstance(hf.get("rope_parameters"), dict) else {}
    scaling = hf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None and not isinstance(scaling, dict):
        raise InvalidArgument(f"rope_scaling must be an object, got {scaling!r}")
    theta = float(params.get("rope_theta", hf.get("rope_theta")) or 10000.0)
    partial = float(hf.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return theta, None, partial
    if kind not in LONGROPE_NAMES:
        raise UnsupportedArchitecture(f"{PHI3_ARCH} with rope scaling {kind!r} is not supported",
                                      hint="supported: longrope (su), or none")
    return theta, scaling, partial


def attention_factor(max_pos: int, original: int) -> float:
    """LongRoPE's cos/sin scale: sqrt(1 + ln(max_pos / original) / ln(original)), 1 when not extended."""
    scale = max_pos / original
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))


def _longrope_keys(hf: dict, scaling: dict, rotary_dim: int) -> dict:
    original = hf.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings"))
    if not isinstance(original, int) or original < 1:
        raise InvalidArgument(f"longrope needs a positive original_max_position_embeddings, got {original!r}")
    factors = {}
    for key in ("short_factor", "long_factor"):
        f = scaling.get(key)
        if not isinstance(f, list) or len(f) != rotary_dim // 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in f):
            raise InvalidArgument(f"rope_scaling.{key} must be {rotary_dim // 2} positive numbers (rotary dim "
                                  f"{rotary_dim} / 2), got {f!r}"[:300])
        factors[key] = [float(x) for x in f]
    max_pos = int(hf.get("max_position_embeddings", original))
    derived = attention_factor(max_pos, original)
    given = scaling.get("attention_factor")
    if given is None and scaling.get("factor") is not None:
        given = attention_factor(int(float(scaling["factor"]) * original), original)
    if given is not None and not math.isclose(float(given), derived, rel_tol=1e-6):
        raise UnsupportedArchitecture(
            f"longrope attention factor {given} differs from the {derived:.6f} that TensorRT-LLM derives from "
            f"max_position_embeddings / original_max_position_embeddings = {max_pos} / {original}")
    return {"original_max_position_embeddings": original, "longrope_scaling_short_factors": factors["short_factor"],
            "longrope_scaling_long_factors": factors["long_factor"]}


def rotary_dim(cfg: dict) -> int:
    d = int(cfg["head_size"])
    return int(d * float(cfg.get("rotary_pct") or 1.0))


def rope_of_phi3(cfg: dict) -> Rope:
    """The spec's rope: ``longrope`` scaling as a hashable tuple (factors as tuples, the attention factor)."""
    dim, base = rotary_dim(cfg), float(cfg.get("rotary_base") or 10000.0)
    if cfg.get("position_embedding_type", "rope_gpt_neox") == "rope_gpt_neox":
        return Rope(dim, base)
    if cfg.get("position_embedding_type") != "long_rope":
        raise UnsupportedArchitecture(f"config.json: position_embedding_type {cfg.get('position_embedding_type')!r} "
                                      f"is not supported for {PHI3_ARCH} (rope_gpt_neox or long_rope)")
    original = int(cfg["original_max_position_embeddings"])
    short, long = (tuple(float(x) for x in cfg[f"longrope_scaling_{k}_factors"]) for k in ("short", "long"))
    if len(short) != dim // 2 or len(long) != dim // 2:
        raise UnsupportedArchitecture(f"config.json: longrope factors need {dim // 2} entries (rotary dim {dim})")
    af = attention_factor(int(cfg.get("max_position_embeddings") or original), original)
    scaling = {"rope_type": "longrope", "type": "longrope", "short_factor": short, "long_factor": long,
               "original_max_position_embeddings": original, "attention_factor": af}
    return Rope(dim, base, tuple(sorted(scaling.items())))


def longrope_tables(rope: Rope, positions: int, long: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos, sin [positions, dim / 2] of a longrope ``Rope``, times its attention factor, as
    transformers computes them (``_compute_longrope_parameters``: inv_freq = 1 / (factor * base^(2i/d))).
    ``long`` None: row p with the short factors while p < original_max_position_embeddings, the long
    ones from there (what one-token decode steps see); True / False: one set for every row (a forward
    over a whole sequence picks the long set when it is longer than the original length)."""
    import torch

    sc = rope.scaling_dict or {}
    original = int(sc["original_max_position_embeddings"])
    shape = torch.arange(0, rope.dim, 2, dtype=torch.int64).float() / rope.dim
    pos = torch.arange(positions, dtype=torch.float32)

    def angles(factors: tuple) -> torch.Tensor:
        inv = 1.0 / (torch.tensor(factors, dtype=torch.float32) * rope.base ** shape)
        return torch.outer(pos, inv)

    if long is None:
        ang = torch.where(pos[:, None] < original, angles(sc["short_factor"]), angles(sc["long_factor"]))
    else:
        ang = angles(sc["long_factor" if long else "short_factor"])
    af = float(sc["attention_factor"])
    return ang.cos() * af, ang.sin() * af


def block_specs(cfg: dict) -> ModelSpec:
    """Every layer: RMSNorm pre-norm, GQA attention (no biases) with GPT-NeoX rope over ``rotary_pct`` of
    each head (plain or longrope; a Kiln ``sliding_window`` key makes it sliding), a plain MLP whose
    ``fc`` is the fused [up; gate] under swiglu; final RMSNorm."""
    nh = int(cfg["num_attention_heads"])
    d = int(cfg.get("head_size") or int(cfg["hidden_size"]) // nh)
    cfg = {**cfg, "head_size": d}
    if cfg.get("hidden_act", "swiglu") != "swiglu":
        raise UnsupportedArchitecture(f"config.json: {PHI3_ARCH} with hidden_act {cfg.get('hidden_act')!r} "
                                      "is not supported (swiglu)")
    window = int(cfg.get("sliding_window") or 0)
    norm = Norm("rms", float(cfg.get("norm_epsilon") or 1e-5))
    attn = Attention("sliding" if window else "full", nh, int(cfg.get("num_key_value_heads") or nh), d,
                     rope=rope_of_phi3(cfg), window=window or None)
    mlp = MLP("plain", "swiglu", intermediate_size=int(cfg["intermediate_size"]))
    return ModelSpec(PHI3_ARCH, int(cfg["hidden_size"]), int(cfg["vocab_size"]),
                     (Block(attn, mlp, norm),) * int(cfg["num_hidden_layers"]), final_norm=norm,
                     tied_head=bool(cfg.get("tie_word_embeddings")))


def engine_weight_map(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(engine tensor, checkpoint tensors), global layer indices: ``qkv`` as stored, the ``gate_up`` slot
    holds the fused ``mlp.fc`` ([up; gate], swiglu), so a quantized fc fills it as the Llama family's does."""
    table: list[tuple[str, tuple[str, ...]]] = [("embed", ("transformer.vocab_embedding.weight",))]
    for i in range(int(cfg["num_hidden_layers"])):
        p, e = f"transformer.layers.{i}.", f"layers.{i}."
        table += [(e + "attn_norm", (p + "input_layernorm.weight",)), (e + "qkv", (p + "attention.qkv.weight",)),
                  (e + "o", (p + "attention.dense.weight",)), (e + "mlp_norm", (p + "post_layernorm.weight",)),
                  (e + "gate_up", (p + "mlp.fc.weight",)), (e + "down", (p + "mlp.proj.weight",))]
    return table + [("final_norm", ("transformer.ln_f.weight",)), ("lm_head", ("lm_head.weight",))]


class Phi3Family(TableArch):
    hf_architectures = (PHI3_ARCH,)
    trt_architectures = (PHI3_ARCH,)
    engine_layout = PHI3_LAYOUT
    block_specs = staticmethod(block_specs)
    engine_weight_map = staticmethod(engine_weight_map)
    hf_prefix_aliases = (("model.", ""),)

    def trt_config(self, hf: dict, dtype: str, mapping: Mapping) -> dict:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_size = int(hf.get("head_dim") or hidden // heads)
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"{PHI3_ARCH} with hidden_act={hf.get('hidden_act')!r} is not supported")
        theta, scaling, partial = _rope_params(hf)
        if not 0.0 < partial <= 1.0 or int(head_size * partial) % 2:
            raise UnsupportedArchitecture(f"partial_rotary_factor {partial} of head_dim {head_size} is not an even "
                                          "number of rotary dims")
        max_pos = int(hf.get("max_position_embeddings", 4096))
        cfg: dict = {
            "architecture": PHI3_ARCH,
            "dtype": dtype,
            "logits_dtype": "float32",
            "vocab_size": int(hf["vocab_size"]),
            "max_position_embeddings": max_pos,
            "hidden_size": hidden,
            "num_hidden_layers": int(hf["num_hidden_layers"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(hf.get("num_key_value_heads") or heads),
            "head_size": head_size,
            "intermediate_size": int(hf["intermediate_size"]),
            "hidden_act": "swiglu",  # TensorRT-LLM's name for silu over the fused [up; gate] fc
            "norm_epsilon": float(hf.get("rms_norm_eps", 1e-5)),
            "position_embedding_type": "rope_gpt_neox",
            "rotary_base": theta,
            "rotary_scaling": None,
            "rotary_pct": partial,
            "mapping": mapping.to_dict(),
            "quantization": base_quantization(),
            "use_parallel_embedding": False,
            "embedding_sharding_dim": 0,
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        }
        if scaling is not None:
            cfg["position_embedding_type"] = "long_rope"
            cfg.update(_longrope_keys(hf, scaling, int(head_size * partial)))
        window = hf.get("sliding_window")
        if isinstance(window, int) and not isinstance(window, bool) and 0 < window < max_pos:
            cfg["sliding_window"] = window  # Kiln's key: TensorRT-LLM's phi3 ignores HF's window
        cfg["mapping"] = mapping.config_dict(cfg["num_hidden_layers"])
        return cfg

    def tensor_specs(self, cfg: dict, rank: int, m: Mapping, dt: torch.dtype | str,
                     shapes_only: bool) -> list[RawTensorSpec]:
        tp = m.tp_size
        H, nh, inter = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
        d = cfg.get("head_size") or H // nh
        kv_r = max((cfg.get("num_key_value_heads") or nh) // tp, 1)
        out: list[RawTensorSpec] = []
        if m.is_first_pp_rank(rank):
            out.append(("transformer.vocab_embedding.weight", (cfg["vocab_size"], H), dt))
        for local, _ in enumerate(m.pp_layers(cfg["num_hidden_layers"], m.pp_rank(rank))):
            p = f"transformer.layers.{local}."
            out += [(p + "input_layernorm.weight", (H,), dt),
                    (p + "attention.qkv.weight", ((nh // tp + 2 * kv_r) * d, H), dt),
                    (p + "attention.dense.weight", (H, nh * d // tp), dt),
                    (p + "post_layernorm.weight", (H,), dt),
                    (p + "mlp.fc.weight", (2 * inter // tp, H), dt),
                    (p + "mlp.proj.weight", (H, inter // tp), dt)]
        if m.is_last_pp_rank(rank):
            out.append(("transformer.ln_f.weight", (H,), dt))
            out.append(("lm_head.weight", (pad_vocab(cfg["vocab_size"], tp) // tp, H), dt))
        return out

    def layer_table(self, cfg: dict, i: int) -> list[W]:
        p = f"model.layers.{i}."
        return [
            W("input_layernorm.weight", p + "input_layernorm.weight", replicate),
            W("attention.qkv.weight", p + "self_attn.qkv_proj.weight", qkv_fused),  # HF rows [Q; K; V]
            W("attention.dense.weight", p + "self_attn.o_proj.weight", row),
            W("post_layernorm.weight", p + "post_attention_layernorm.weight", replicate),
            W("mlp.fc.weight", p + "mlp.gate_up_proj.weight", swiglu_halves),
            W("mlp.proj.weight", p + "mlp.down_proj.weight", row),
        ]

    def global_table(self, cfg: dict, first: bool, last: bool, source: WeightSource) -> list[W]:
        out = []
        if first:
            out.append(W("transformer.vocab_embedding.weight", "model.embed_tokens.weight", replicate))
        if last:
            out.append(W("transformer.ln_f.weight", "model.norm.weight", replicate))
            head = "lm_head.weight"
            if cfg.get("tie_word_embeddings") or head not in source:
                if not cfg.get("tie_word_embeddings"):
                    raise InvalidArgument("lm_head.weight is missing and tie_word_embeddings is false",
                                          hint="the weights do not match config.json")
                head = "model.embed_tokens.weight"
            out.append(W("lm_head.weight", head, vocab_parallel))
        return out


PHI3 = Phi3Family()

"""Qwen3 (``Qwen3ForCausalLM``) -> TensorRT-LLM checkpoint: the Llama layout plus per-head q/k RMSNorm.

TensorRT-LLM converts Qwen3 with its QWen family (``models/qwen/config.py``, ``convert.py``; facts and
citations in docs/reference/families.md): architecture ``Qwen3ForCausalLM``, ``qwen_type`` ``qwen3``,
no attention bias, an explicit ``head_size`` (``head_dim``, which need not be hidden / heads), fused
qkv per rank [Q_r; K_r; V_r], ``gate_proj`` -> ``mlp.fc`` (the silu branch), ``up_proj`` ->
``mlp.gate``, and ``self_attn.q_norm`` / ``k_norm`` -> ``attention.q_layernorm`` / ``k_layernorm``
([head_size], whole on every rank: the norm runs per head, before rope).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..checkpoint.mapping import Mapping
from ..errors import UnsupportedArchitecture
from .base import RawTensorSpec, W, replicate
from .llama import ENGINE_LAYOUT, LlamaFamily
from .llama import block_specs as llama_block_specs
from .llama import engine_weight_map as llama_weight_map
from .spec import ModelSpec, Norm

if TYPE_CHECKING:
    import torch

ARCH = "Qwen3ForCausalLM"


def block_specs(cfg: dict) -> ModelSpec:
    """Llama's blocks with an RMSNorm of q and of k per head (the block's epsilon)."""
    if not cfg.get("qk_layernorm", True):
        raise UnsupportedArchitecture("config.json: a Qwen3 checkpoint has qk_layernorm=true")
    spec = llama_block_specs({**cfg, "qk_layernorm": False})
    blocks = tuple(replace(b, attention=replace(b.attention, qk_norm=Norm("rms", b.norm.eps))) for b in spec.blocks)
    return replace(spec, blocks=blocks)


def engine_weight_map(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """Llama's engine layout plus ``layers.{i}.q_norm`` / ``k_norm``."""
    table = llama_weight_map({**cfg, "qk_layernorm": False})
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"transformer.layers.{i}.attention."
        table += [(f"layers.{i}.q_norm", (p + "q_layernorm.weight",)), (f"layers.{i}.k_norm", (p + "k_layernorm.weight",))]
    return table


class Qwen3Family(LlamaFamily):
    hf_architectures: tuple[str, ...] = (ARCH,)  # type: ignore[assignment]
    trt_architectures: tuple[str, ...] = (ARCH,)  # type: ignore[assignment]
    engine_layout = ENGINE_LAYOUT  # the Llama engine layout: q_norm / k_norm are slots of it
    block_specs = staticmethod(block_specs)
    engine_weight_map = staticmethod(engine_weight_map)

    def trt_config(self, hf: dict, dtype: str, mapping: Mapping) -> dict:
        if hf.get("use_sliding_window"):
            raise UnsupportedArchitecture("Qwen3 with use_sliding_window=true is not supported")
        if hf.get("attention_bias"):
            raise UnsupportedArchitecture("Qwen3 with attention_bias=true is not supported "
                                          "(TensorRT-LLM writes Qwen3 without attention biases)")
        cfg = super().trt_config(hf, dtype, mapping)
        cfg.update({"attn_bias": False, "qk_layernorm": True, "qwen_type": "qwen3",
                    # QWenConfig.to_dict's own fields (models/qwen/config.py)
                    "seq_length": int(hf.get("seq_length", 8192)), "use_logn_attn": False,
                    "disable_weight_only_quant_plugin": False, "mlp_only_layers": [], "decoder_sparse_step": 1})
        return cfg

    def tensor_specs(self, cfg: dict, rank: int, m: Mapping, dt: torch.dtype | str,
                     shapes_only: bool) -> list[RawTensorSpec]:
        base: list = super().tensor_specs({**cfg, "architecture": "LlamaForCausalLM"}, rank, m, dt, shapes_only)
        out: list = []
        d = int(cfg["head_size"])
        for name, shape, t in base:  # the q/k norms take the dtype of the layer's dense weight
            out.append((name, shape, t))
            if name.endswith(".attention.dense.weight"):
                p = name[: -len("dense.weight")]
                out += [(p + "q_layernorm.weight", (d,), t), (p + "k_layernorm.weight", (d,), t)]
        return out

    def layer_table(self, cfg: dict, i: int) -> list[W]:
        a = f"model.layers.{i}.self_attn."
        return super().layer_table({**cfg, "architecture": "LlamaForCausalLM"}, i) + [
            W("attention.q_layernorm.weight", a + "q_norm.weight", replicate),
            W("attention.k_layernorm.weight", a + "k_norm.weight", replicate),
        ]


QWEN3 = Qwen3Family()

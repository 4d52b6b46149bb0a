"""Names, shapes and dtypes of every quantized tensor (trtllm.md §4), derived from the unquantized spec.

``quantized_expected(config, rank, base)`` turns the float layout of one rank into the quantized one;
``validate_checkpoint`` calls it whenever ``quant_algo`` or ``kv_cache_quant_algo`` is set, and the
quantizer sizes its output files from it, so writer and validator can never disagree.

Per quantized linear ``<p>`` ([out, in] in the float layout; model dtype ``dt``):

| quant_algo | tensors |
|---|---|
| FP8 | weight fp8 [out,in]; weights_scaling_factor f32 (1,); activation_scaling_factor f32 (1,) |
| FP8_PER_CHANNEL_PER_TOKEN | weight fp8 [out,in]; per_channel_scale f32 [out] |
| W8A16 | weight int8 [in,out]; per_channel_scale dt [out] |
| W4A16 | weight int8 [in,out/2] (two int4, even output column in the low nibble); per_channel_scale dt [out] |
| W4A16_AWQ | weight int8 [out/2,in] (even output row in the low nibble); weights_scaling_factor dt [out,in/g]; prequant_scaling_factor dt [in]; zero dt [out,in/g] with has_zero_point |
| W8A8_SQ_PER_CHANNEL | weight int8 [out,in]; weights_scaling_factor f32 [out]; activation_scaling_factor f32 (1,); prequant_scaling_factor dt [in] |
| W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN | weight int8 [out,in]; per_channel_scale f32 [1,out]; smoother f32 [1,in] (dense, proj); per layer {input,post}_layernorm.scale_to_int, {attention,mlp}.quantization_scaling_factor f32 (1,) |
| KV cache INT8 / FP8 | transformer.layers.i.attention.kv_cache_scaling_factor f32 (1,) |

Caveat (unverified against a TensorRT-LLM build): TensorRT-LLM's own converter stores W8A16/W4A16 int8
weights already permuted for its mixed-GEMM kernels (``preprocess_weights_for_mixed_gemm``, per GPU
arch) and skips preprocessing for int8 weights at load. Kiln stores them plain row-major (the shapes
above), which Kiln's runtimes read; the record ``kiln_quantization.weight_layout`` says so. W4A16_AWQ
is stored the way ModelOpt exports it and TensorRT-LLM preprocesses it at load, so it has no such gap.
"""

from __future__ import annotations

import re

import torch

from ..errors import InvalidCheckpoint
from . import config as qc

Spec = list[tuple[str, tuple[int, ...], torch.dtype]]
LINEAR_SUFFIXES = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj",
                   "ffn.fc", "ffn.gate", "ffn.proj")
ROW_PARALLEL = ("attention.dense", "mlp.proj", "ffn.proj")  # inputs are the smoothed-at-runtime ones
F32 = torch.float32
FP8_DT = torch.float8_e4m3fn
_LAYER = re.compile(r"^(transformer\.layers\.\d+)\.")


def linear_module(name: str, shape: tuple[int, ...]) -> str | None:
    """The module name of a quantizable linear weight (``...attention.qkv``), else None."""
    if not name.endswith(".weight") or len(shape) != 2:
        return None
    module = name[: -len(".weight")]
    return module if module.endswith(LINEAR_SUFFIXES) and _LAYER.match(module) else None


def is_quantized_linear(name: str, shape: tuple[int, ...], quant: dict) -> bool:
    module = linear_module(name, shape)
    return bool(module and quant.get("quant_algo") and not qc.is_excluded(module, quant.get("exclude_modules")))


def linear_layout(algo: str, module: str, out: int, inp: int, dt: torch.dtype, group: int,
                  zero_point: bool) -> Spec:
    p = module + "."
    if algo == qc.FP8:
        return [(p + "weight", (out, inp), FP8_DT), (p + "weights_scaling_factor", (1,), F32),
                (p + "activation_scaling_factor", (1,), F32)]
    if algo == qc.FP8_PER_CHANNEL_PER_TOKEN:
        return [(p + "weight", (out, inp), FP8_DT), (p + "per_channel_scale", (out,), F32)]
    if algo == qc.W8A16:
        return [(p + "weight", (inp, out), torch.int8), (p + "per_channel_scale", (out,), dt)]
    if algo == qc.W4A16:
        _even(out, module)
        return [(p + "weight", (inp, out // 2), torch.int8), (p + "per_channel_scale", (out,), dt)]
    if algo == qc.W4A16_AWQ:
        _even(out, module)
        if inp % group:
            raise InvalidCheckpoint(f"{module}: input features {inp} are not divisible by group_size {group}")
        spec = [(p + "weight", (out // 2, inp), torch.int8), (p + "weights_scaling_factor", (out, inp // group), dt),
                (p + "prequant_scaling_factor", (inp,), dt)]
        return spec + ([(p + "zero", (out, inp // group), dt)] if zero_point else [])
    if algo == qc.W8A8_SQ_PER_CHANNEL:
        return [(p + "weight", (out, inp), torch.int8), (p + "weights_scaling_factor", (out,), F32),
                (p + "activation_scaling_factor", (1,), F32), (p + "prequant_scaling_factor", (inp,), dt)]
    if algo == qc.W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN:
        spec = [(p + "weight", (out, inp), torch.int8), (p + "per_channel_scale", (1, out), F32)]
        return spec + ([(p + "smoother", (1, inp), F32)] if module.endswith(ROW_PARALLEL) else [])
    raise InvalidCheckpoint(f"quant_algo {algo!r} has no known checkpoint layout")


def _even(out: int, module: str) -> None:
    if out % 2:
        raise InvalidCheckpoint(f"{module}: {out} output features cannot be packed two int4 per byte")


def quantized_expected(config: dict, rank: int, base: Spec) -> Spec:
    quant = config.get("quantization") or {}
    algo = quant.get("quant_algo")
    if algo is not None and algo not in qc.QUANT_ALGOS:
        raise InvalidCheckpoint(f"quant_algo {algo!r} is not a layout Kiln knows",
                                hint=f"known: {', '.join(qc.QUANT_ALGOS)}")
    kv = quant.get("kv_cache_quant_algo")
    if kv is not None and kv not in qc.KV_CACHE_ALGOS:
        raise InvalidCheckpoint(f"kv_cache_quant_algo {kv!r} is not one of {', '.join(qc.KV_CACHE_ALGOS)}")
    group = int(quant.get("group_size") or 128)
    out: Spec = []
    layers_seen: dict[str, set[str]] = {}
    for name, shape, dt in base:
        m = _LAYER.match(name)
        if m:
            layers_seen.setdefault(m.group(1), set()).add(name[len(m.group(1)) + 1:])
        if algo and is_quantized_linear(name, tuple(shape), quant):
            module = name[: -len(".weight")]
            out += linear_layout(algo, module, shape[0], shape[1], dt, group, bool(quant.get("has_zero_point")))
        else:
            out.append((name, tuple(shape), dt))
    for layer, names in layers_seen.items():
        if algo == qc.W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN:
            for norm, block in (("input_layernorm", "attention"), ("post_layernorm", "mlp")):
                if f"{norm}.weight" in names:
                    out += [(f"{layer}.{norm}.scale_to_int", (1,), F32),
                            (f"{layer}.{block}.quantization_scaling_factor", (1,), F32)]
        if kv and "attention.qkv.weight" in names:
            out.append((f"{layer}.attention.kv_cache_scaling_factor", (1,), F32))
    return out

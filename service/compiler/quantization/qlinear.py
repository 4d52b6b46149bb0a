"""Execute quantized linears from their stored low-precision tensors (dequantize on the fly, CPU or GPU).

The public API other runtimes call (Kiln's reference runtime, the torch engine):

    y = qlinear(x, tensors, "transformer.layers.3.mlp.fc", quantization)   # x [..., in] -> [..., out]
    w = dequantize_weight(tensors, module, quantization)                  # float32 [out, in]
    k, v = qdq_kv_cache(k, v, tensors, "transformer.layers.3", quantization)

``tensors`` maps checkpoint names to tensors (a rank file's dict, or layer-local names with
``module`` layer-local too); ``quantization`` is the checkpoint config's ``quantization`` object. A
module whose weight is floating point (excluded, or no quant_algo) is a plain ``x @ Wᵀ + b``. What is
simulated matches the engine's arithmetic: FP8 rounds both GEMM operands to E4M3 (static per-tensor or
dynamic per-token activations); SmoothQuant smooths, quantizes the input to int8 with the static scale,
multiplies integers and rescales; weight-only and AWQ dequantize the int8 / packed int4 weights
(AWQ after multiplying the input by ``prequant_scaling_factor``). Accumulation is float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import config as qc
from .fp8 import fp8_linear, fp8_rowwise_linear
from .kv_cache import qdq_kv
from .smoothquant import quantize_activation_int8, sq_linear
from .weight_only import dequantize_groupwise, dequantize_weight_only, unpack_int4_rows

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _algo(quant: Mapping | None, weight: torch.Tensor) -> str | None:
    if weight.dtype in FLOAT_DTYPES:
        return None
    return (quant or {}).get("quant_algo")


def dequantize_weight(tensors: Mapping[str, torch.Tensor], module: str, quant: Mapping | None) -> torch.Tensor:
    """The float32 [out, in] weight the engine effectively multiplies by (SmoothQuant: times 1/pqs folded back)."""
    p = module + "."
    w = tensors[p + "weight"]
    algo = _algo(quant, w)
    if algo is None:
        return w.float()
    if algo == qc.FP8:
        return w.float() * tensors[p + "weights_scaling_factor"].float()
    if algo == qc.FP8_PER_CHANNEL_PER_TOKEN:
        return w.float() * tensors[p + "per_channel_scale"].float()[:, None]
    if algo in (qc.W8A16, qc.W4A16):
        return dequantize_weight_only(w, tensors[p + "per_channel_scale"], 8 if algo == qc.W8A16 else 4)
    if algo == qc.W4A16_AWQ:
        group = int((quant or {}).get("group_size") or 128)
        wq = dequantize_groupwise(unpack_int4_rows(w), tensors[p + "weights_scaling_factor"],
                                  tensors.get(p + "zero"), group)
        return wq * tensors[p + "prequant_scaling_factor"].float()[None, :]
    if algo == qc.W8A8_SQ_PER_CHANNEL:
        wq = w.float() * tensors[p + "weights_scaling_factor"].float()[:, None]
        return wq * tensors[p + "prequant_scaling_factor"].float()[None, :]
    if algo == qc.W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN:
        wq = w.float() * tensors[p + "per_channel_scale"].float().reshape(-1)[:, None]
        sm = tensors.get(p + "smoother")
        return wq if sm is None else wq / sm.float().reshape(1, -1)
    raise ValueError(f"no dequantization for quant_algo {algo!r}")


def qlinear(x: torch.Tensor, tensors: Mapping[str, torch.Tensor], module: str, quant: Mapping | None) -> torch.Tensor:
    """``x @ Wᵀ + b`` computed the way the engine computes it from the stored tensors."""
    p = module + "."
    w = tensors[p + "weight"]
    algo = _algo(quant, w)
    xf = x.float()
    if algo is None:
        y = xf @ w.float().t()
    elif algo == qc.FP8:
        y = fp8_linear(xf, w, tensors[p + "weights_scaling_factor"].float(),
                       tensors[p + "activation_scaling_factor"].float())
    elif algo == qc.FP8_PER_CHANNEL_PER_TOKEN:
        y = fp8_rowwise_linear(xf, w, tensors[p + "per_channel_scale"].float())
    elif algo == qc.W8A8_SQ_PER_CHANNEL:
        y = sq_linear(xf, w, tensors[p + "weights_scaling_factor"], tensors[p + "activation_scaling_factor"].float(),
                      tensors[p + "prequant_scaling_factor"])
    elif algo == qc.W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN:
        sm = tensors.get(p + "smoother")
        xs = xf if sm is None else xf / sm.float().reshape(-1)
        tok = xs.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
        y = (quantize_activation_int8(xs, tok) @ w.float().t()) * tok * tensors[p + "per_channel_scale"].float().reshape(-1)
    else:  # weight-only / AWQ: 16-bit activations times the dequantized weight
        y = xf @ dequantize_weight(tensors, module, quant).t()
    b = tensors.get(p + "bias")
    return y if b is None else y + b.float()


def qdq_kv_cache(k: torch.Tensor, v: torch.Tensor, tensors: Mapping[str, torch.Tensor], layer: str,
                 quant: Mapping | None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as read back from the engine's quantized KV cache (unchanged without kv_cache_quant_algo)."""
    algo = (quant or {}).get("kv_cache_quant_algo")
    if not algo:
        return k, v
    scale = tensors[(layer + "." if layer else "") + "attention.kv_cache_scaling_factor"]
    return qdq_kv(k, scale, algo), qdq_kv(v, scale, algo)


def layer_linear(layer_tensors: Mapping[str, torch.Tensor], quant: Mapping | None):
    """A ``Decoder`` linear over one layer's layer-local tensors."""
    return lambda module, x: qlinear(x, layer_tensors, module, quant)


def layer_kv(layer_tensors: Mapping[str, torch.Tensor], quant: Mapping | None):
    if not (quant or {}).get("kv_cache_quant_algo"):
        return None
    return lambda k, v: qdq_kv_cache(k, v, layer_tensors, "", quant)


QUANT_PARAM_SUFFIXES = (".weights_scaling_factor", ".activation_scaling_factor", ".prequant_scaling_factor",
                        ".per_channel_scale", ".zero", ".smoother", ".scale_to_int", ".quantization_scaling_factor",
                        ".kv_cache_scaling_factor")


def keeps_stored_dtype(name: str, t: torch.Tensor) -> bool:
    """Tensors a runtime must not cast to its compute dtype: quantized weights and every scale."""
    return t.dtype not in FLOAT_DTYPES or name.endswith(QUANT_PARAM_SUFFIXES)


def load_quantized_checkpoint(ckpt_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors as stored) of a world-size-1 quantized checkpoint, after ``validate_checkpoint``.

    Tied models without ``lm_head.weight`` get the embedding table as their head.
    """
    import json
    from pathlib import Path

    from ..checkpoint.safetensors_io import SafetensorsFile
    from ..checkpoint.validate import validate_checkpoint
    from ..errors import InvalidCheckpoint

    d = Path(ckpt_dir)
    report = validate_checkpoint(d, strict=True)
    if not report.ok:
        raise InvalidCheckpoint(f"{d}: " + "; ".join(report.errors[:5]))
    config = json.loads((d / "config.json").read_text())
    if report.world_size != 1:
        raise InvalidCheckpoint(f"{d}: quantized checkpoints are executed at tp_size=pp_size=1 "
                                f"(world size {report.world_size})")
    with SafetensorsFile(d / "rank0.safetensors") as f:
        tensors = {n: f.tensor(n).clone() for n in f.keys()}
    if "lm_head.weight" not in tensors and "transformer.vocab_embedding.weight" in tensors:
        tensors["lm_head.weight"] = tensors["transformer.vocab_embedding.weight"].clone()
    return config, tensors

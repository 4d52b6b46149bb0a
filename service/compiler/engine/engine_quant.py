"""Quantized linears in the torch engine: the checkpoint's low-precision tensors in the kernels' layout.

The engine runs a quantized checkpoint from its stored FP8 / int8 / int4 weights, never from a float
copy. Per engine linear slot (``qkv``, ``o``, ``gate_up``, ``down``) the engine file holds:

    layers.{i}.{slot}.weight      FP8 E4M3 [N, K] | int8 [N, K] | int4 [N, K/2] packed along K by
                                  ``kernels.pack_int4_halves`` (block in ``int4_block``)
    layers.{i}.{slot}.scale       float32: per output row [N] (FP8, FP8 per-channel, W8A16, W4A16) or
                                  per group [N, K/group] (W4A16_AWQ)
    layers.{i}.{slot}.act_scale   float32 (1,): FP8's static activation scale
    layers.{i}.{slot}.pqs         AWQ's per-input pre-quant scale [K];  .zero  AWQ's additive zero [N, K/g]
    layers.{i}.kv_scale           float32 (1,): the KV cache scale when kv_cache_quant_algo is set

``gate_up`` stacks ``mlp.fc`` over ``mlp.gate`` as in the float engine: their weight scales stay per row,
FP8's two activation scales become their maximum (what TensorRT-LLM's gated-MLP fusion does), AWQ's
pre-quant scales must be equal (Kiln's AWQ searches one scale for the shared input).

Arithmetic (``qlinear_forward``): on CUDA with at most ``kernels.GEMV_MAX_ROWS`` rows (decode) one
Triton kernel reads the packed weight once (FP8: activations rounded to E4M3 with their scale, E4M3 x
E4M3 products accumulated in float32; int: weights dequantized in registers); with more rows (prefill)
FP8 runs ``torch._scaled_mm`` and integer weights are dequantized to the model dtype for one GEMM (on
CUDA by one Triton pass, ``kernels.dequantize``: packed bytes in, the dense weight out); on
CPU the same roundings are computed in float32, which is what ``quantization.qlinear`` (the reference
runtime's arithmetic) computes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import InvalidCheckpoint
from ..quantization import config as qc
from ..quantization.fp8 import scale_from_amax, to_fp8
from ..quantization.kv_cache import qdq_kv as _qdq_kv
from ..quantization.weight_only import dequantize_groupwise, unpack_int4_rows

W_FP8, W_INT8, W_INT4 = 1, 2, 3  # kernels.W_* (kept here so CPU engines need no Triton)
ENGINE_QUANT_ALGOS = (qc.FP8, qc.FP8_PER_CHANNEL_PER_TOKEN, qc.W8A16, qc.W4A16, qc.W4A16_AWQ)
SLOTS = {"qkv": ("attention.qkv",), "o": ("attention.dense",), "gate_up": ("mlp.fc", "mlp.gate"),
         "down": ("mlp.proj",)}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class QLinear(NamedTuple):
    weight: torch.Tensor
    scale: torch.Tensor
    act_scale: torch.Tensor | None
    pqs: torch.Tensor | None
    zero: torch.Tensor | None
    kind: int
    group: int  # 0 = one scale per output row
    dynamic: bool  # FP8 per-token activation scales
    int4_block: int


def check_engine_quant(quant: dict | None, arch: str) -> None:
    """Refuse, before anything is written, what the torch engine cannot execute."""
    algo = (quant or {}).get("quant_algo")
    kv = (quant or {}).get("kv_cache_quant_algo")
    if algo is None and kv is None:
        return
    if kv is not None and kv not in ("INT8", "FP8"):
        raise InvalidCheckpoint(f"kv_cache_quant_algo {kv!r} is not INT8 or FP8")
    if algo is not None and algo not in ENGINE_QUANT_ALGOS:
        raise InvalidCheckpoint(
            f"the torch engine does not execute {algo} checkpoints",
            hint=f"it runs {', '.join(ENGINE_QUANT_ALGOS)}; build {algo} with the trtllm backend")
    if arch not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "Qwen3ForCausalLM",
                    "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):  # the fused qkv / gate_up layout
        raise InvalidCheckpoint(f"quantized {arch} checkpoints ({algo or f'{kv} KV cache'}) are not built by the "
                                "torch engine",
                                hint="quantized engines cover the Llama family, Phi-3, Qwen3 and Gemma")


def int4_block_for(k: int, group: int) -> int:
    """The int4 packing block for K input features and a group size: 2 x min(group, 256), per channel
    (group 0) 1024 — long contiguous byte runs per kernel step; smaller where K needs it."""
    half = min(group, 256) if group else 512
    while k % (2 * half):
        half //= 2
    if half < 16 or (group and group % half):
        raise InvalidCheckpoint(f"no int4 packing block fits {k} input features with group size {group}")
    return 2 * half


def int4_fast_supported(x_dtype: torch.dtype, w_scale: torch.Tensor | None, int4_block: int, group: int = 0,
                        pre_quant_scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> bool:
    """Where the engine takes the bit-unpacking kernel: per-channel int4 (W4A16) with bf16/fp16
    activations — the case it was measured faster in (benchmarks/README-engine.md, third session).
    Group scales, AWQ pre-quant scales and zeros work in it (kernel_bench checks them) but were not
    faster there, so those keep the converting kernel."""
    return (x_dtype in (torch.bfloat16, torch.float16) and int4_block > 0 and w_scale is not None
            and w_scale.numel() > 1 and group == 0 and pre_quant_scale is None and zero is None)


INT4_BATCH1_KERNELS = ("cuda_cores", "cuda_cores_bytes", "cuda_cores_words", "tensor_cores")


def int4_batch1_kernel() -> str:
    """Which kernel batch-1 per-channel int4 (W4A16) GEMVs take: "cuda_cores" (``gemv_int4v``, the
    default: on the H100, 8B per layer 95.6 -> 86.6 us, faster on 7 of the 8 swept 1B/8B matrices,
    1B o 5.6 -> 5.8 us; benchmarks/README-engine.md, sixth session) or "tensor_cores"
    (``gemv_int4h``). On the CUDA cores the weight is read as bytes (``_gemv_int4v``) or int32 words
    (``_gemv_int4w``), chosen per shape by ``kernels.int4_words`` (seventh session's sweep), or forced
    by "cuda_cores_bytes" / "cuda_cores_words". ``KILN_INT4_BATCH1_KERNEL`` overrides, read at each
    call (a CUDA graph keeps the kernel it captured)."""
    choice = os.environ.get("KILN_INT4_BATCH1_KERNEL", "cuda_cores")
    if choice not in INT4_BATCH1_KERNELS:
        raise ValueError(f"KILN_INT4_BATCH1_KERNEL must be one of {', '.join(INT4_BATCH1_KERNELS)}, got {choice!r}")
    return choice


def int4_gemv_kernel(x_dtype: torch.dtype, rows: int, w_scale: torch.Tensor | None, int4_block: int, group: int,
                     pre_quant_scale: torch.Tensor | None, zero: torch.Tensor | None,
                     int4_fast: bool | str | None = None, tiles_given: bool = False) -> str:
    """Which decode kernel an int4 GEMV takes (``kernels.gemv``): "cuda_cores" (``gemv_int4v``, batch
    1, per channel; bytes or int32 words by the weight's shape), "cuda_cores_bytes" /
    "cuda_cores_words" (the same, forced; group-wise int4 — AWQ's group scales, pre-quant scales and
    zeros — always takes the words), "unpack" (``gemv_int4h``, tensor cores on nibbles unpacked in
    registers) or "convert" (the weight converted to the activation dtype per step). ``int4_fast``:
    None = by these rules, True = "unpack", False = "convert", "vec" = "cuda_cores_bytes", "word" =
    "cuda_cores_words"; ``tiles_given``: the caller's tiles are in the unpacking kernel's format, so
    the automatic choice stays there. Group-wise int4 with more than one row, or with
    ``KILN_INT4_BATCH1_KERNEL`` naming another kernel, converts (the bit-unpacking kernel was not
    faster for it: third session)."""
    grouped = bool(group) or pre_quant_scale is not None or zero is not None
    if int4_fast in ("vec", "word"):
        if not int4_block or (int4_fast == "vec" and grouped):
            raise ValueError("the CUDA-core int4 kernel handles int4 packed in halves only, and per channel only "
                             "on bytes (int4_fast='vec'); groups take int4_fast='word'")
        return "cuda_cores_bytes" if int4_fast == "vec" else "cuda_cores_words"
    if int4_fast is True:
        return "unpack"
    if int4_fast is False:
        return "convert"
    if not int4_fast_supported(x_dtype, w_scale, int4_block):  # the same tests, groups aside
        return "convert"
    choice = int4_batch1_kernel() if rows == 1 and not tiles_given else "tensor_cores"
    if grouped:
        return "cuda_cores_words" if choice in ("cuda_cores", "cuda_cores_words") else "convert"
    return "unpack" if choice == "tensor_cores" else choice


def pack_int4_halves(q: torch.Tensor, block: int) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> int8 [N, K/2]: in each ``block`` of K, byte j holds k = j (low nibble)
    and k = block/2 + j (high nibble), so the kernel unpacks two contiguous half-blocks, no shuffle."""
    n, k = q.shape
    qb = q.reshape(n, k // block, 2, block // 2).to(torch.int16)
    lo, hi = qb[:, :, 0], qb[:, :, 1]
    return ((lo & 0x0F) | ((hi & 0x0F) << 4)).to(torch.uint8).view(torch.int8).reshape(n, k // 2).contiguous()


def unpack_int4_halves(packed: torch.Tensor, block: int) -> torch.Tensor:
    n, kh = packed.shape
    b = packed.view(torch.uint8).to(torch.int16).reshape(n, kh * 2 // block, block // 2)
    lo, hi = b & 0x0F, (b >> 4) & 0x0F
    lo, hi = torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)
    return torch.stack([lo, hi], 2).reshape(n, kh * 2).to(torch.int8)


def _module_q(tensors, module: str, algo: str, group: int) -> dict[str, torch.Tensor]:
    """One checkpoint module -> {q: int8/fp8 [N, K] (int4 unpacked to int8), scale, act, pqs, zero}."""
    p = module + "."
    w = tensors[p + "weight"]
    if algo == qc.FP8:
        n = w.shape[0]
        return {"q": w, "scale": tensors[p + "weights_scaling_factor"].float().reshape(1).expand(n).clone(),
                "act": tensors[p + "activation_scaling_factor"].float().reshape(1)}
    if algo == qc.FP8_PER_CHANNEL_PER_TOKEN:
        return {"q": w, "scale": tensors[p + "per_channel_scale"].float().reshape(-1)}
    if algo == qc.W8A16:
        return {"q": w.t().contiguous(), "scale": tensors[p + "per_channel_scale"].float()}
    if algo == qc.W4A16:
        # [K, N/2] packed along N -> [N, K]: unpack_int4_cols(w).t() without its two transposing copies
        return {"q": unpack_int4_rows(w.t().contiguous()), "scale": tensors[p + "per_channel_scale"].float()}
    if algo == qc.W4A16_AWQ:
        out = {"q": unpack_int4_rows(w), "scale": tensors[p + "weights_scaling_factor"].float(),
               "pqs": tensors[p + "prequant_scaling_factor"].float()}
        if p + "zero" in tensors:
            out["zero"] = tensors[p + "zero"].float()
        return out
    raise InvalidCheckpoint(f"the torch engine does not execute {algo}")


def quantized_layer_tensors(tensors, layer: int, quant: dict) -> dict[str, torch.Tensor]:
    """The engine tensors of one layer's quantized linears (and KV scale), from checkpoint tensors."""
    algo = quant["quant_algo"]
    group = int(quant.get("group_size") or 128) if algo == qc.W4A16_AWQ else 0
    out: dict[str, torch.Tensor] = {}
    base = f"transformer.layers.{layer}."
    for slot, modules in SLOTS.items():
        if slot == "gate_up" and base + "mlp.gate.weight" not in tensors:
            modules = ("mlp.fc",)  # Phi-3: one fused swiglu fc [up; gate]
        floats = [tensors[base + m + ".weight"].dtype in FLOAT_DTYPES for m in modules]
        if all(floats):
            continue  # an excluded module: the float engine tensor serves it
        if any(floats):
            raise InvalidCheckpoint(f"{base}: {' and '.join(modules)} are fused by the engine but only some are "
                                    "quantized", hint="exclude both or neither")
        parts = [_module_q(tensors, base + m, algo, group) for m in modules]
        e = f"layers.{layer}.{slot}."
        q = torch.cat([p["q"] for p in parts], 0)
        if algo in (qc.W4A16, qc.W4A16_AWQ):
            q = pack_int4_halves(q, int4_block_for(q.shape[1], group))
        out[e + "weight"] = q.contiguous()
        out[e + "scale"] = torch.cat([p["scale"] for p in parts], 0).contiguous()
        if "act" in parts[0]:
            out[e + "act_scale"] = torch.stack([p["act"] for p in parts]).amax(0).reshape(1)
        if "pqs" in parts[0]:
            if q.device.type != "meta" and any(not torch.equal(parts[0]["pqs"], p["pqs"]) for p in parts[1:]):
                raise InvalidCheckpoint(f"{base}: mlp.fc and mlp.gate have different AWQ pre-quant scales; "
                                        "the engine fuses them over one input")
            out[e + "pqs"] = parts[0]["pqs"].contiguous()
        if "zero" in parts[0]:
            out[e + "zero"] = torch.cat([p["zero"] for p in parts], 0).contiguous()
    kv = tensors.get(base + "attention.kv_cache_scaling_factor")
    if quant.get("kv_cache_quant_algo") and kv is not None:
        out[f"layers.{layer}.kv_scale"] = kv.float().reshape(1)
    return out


class TensorView(Mapping):
    """Checkpoint tensors, each passed through ``fn`` when read (to meta tensors for shapes alone, to a
    device for the conversion)."""

    def __init__(self, tensors, fn: Callable[[torch.Tensor], torch.Tensor]):
        self._t, self._fn = tensors, fn

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._fn(self._t[name])

    def __iter__(self):
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)


def _as_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def quantized_layer_specs(tensors, layer: int, quant: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of ``quantized_layer_tensors``' output, computed on meta tensors: what
    the engine file's header needs before the bytes, without unpacking and repacking the weights."""
    return {n: (t.dtype, tuple(t.shape)) for n, t in quantized_layer_tensors(TensorView(tensors, _as_meta), layer, quant).items()}


def quantized_slots(layer_tensors: dict[str, torch.Tensor], layer: int) -> set[str]:
    return {s for s in SLOTS if f"layers.{layer}.{s}.weight" in layer_tensors}


def load_qlinear(weights: dict[str, torch.Tensor], name: str, quant: dict) -> QLinear | None:
    """The QLinear for engine slot ``name`` (``layers.3.qkv``), or None when it is a float tensor."""
    w = weights.get(name + ".weight")
    if w is None:
        return None
    algo = quant["quant_algo"]
    group = int(quant.get("group_size") or 128) if algo == qc.W4A16_AWQ else 0
    kind = {qc.FP8: W_FP8, qc.FP8_PER_CHANNEL_PER_TOKEN: W_FP8, qc.W8A16: W_INT8}.get(algo, W_INT4)
    block = int4_block_for(w.shape[1] * 2, group) if kind == W_INT4 else 0
    return QLinear(w, weights[name + ".scale"], weights.get(name + ".act_scale"), weights.get(name + ".pqs"),
                   weights.get(name + ".zero"), kind, group, algo == qc.FP8_PER_CHANNEL_PER_TOKEN, block)


def dequantize(q: QLinear) -> torch.Tensor:
    """The float32 [N, K] weight of an integer QLinear (scales and zero applied)."""
    w = unpack_int4_halves(q.weight, q.int4_block) if q.kind == W_INT4 else q.weight
    if q.group:
        return dequantize_groupwise(w, q.scale, q.zero, q.group)
    return w.float() * q.scale.float()[:, None]


def _fp8_act(x: torch.Tensor, q: QLinear) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dynamic:
        s = scale_from_amax(x.float().abs().amax(-1, keepdim=True))
    else:
        assert q.act_scale is not None, "a static FP8 linear carries its activation scale"
        s = q.act_scale.float()
    return to_fp8(x, s), s


def qlinear_forward(x: torch.Tensor, q: QLinear, bias: torch.Tensor | None = None,
                    gemv=None, dequant=None) -> torch.Tensor:
    """``x @ Wᵀ (+ bias)`` from the stored low-precision weight, in x's dtype. ``gemv`` / ``dequant``: the
    Triton kernel wrappers (``kernels.engine_gemv`` for decode, ``kernels.engine_dequantize`` for the
    prefill GEMM's weight) when the caller runs on CUDA, else None."""
    rows = x.numel() // x.shape[-1]
    if gemv is not None and rows <= 16:
        return gemv(x, q.weight, kind=q.kind, w_scale=q.scale, act_scale=q.act_scale, group=q.group,
                    pre_quant_scale=q.pqs, zero=q.zero, bias=bias, dynamic_token=q.dynamic,
                    int4_block=q.int4_block)
    if q.pqs is not None:
        x = (x.float() * q.pqs.float()).to(x.dtype)
    if q.kind == W_FP8:
        xq, s = _fp8_act(x, q)
        n, k = q.weight.shape
        if x.is_cuda and n % 16 == 0 and k % 16 == 0:
            x2 = xq.reshape(-1, k)
            one = torch.ones((), dtype=torch.float32, device=x.device)
            y = torch._scaled_mm(x2, q.weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            y = y.reshape(*x.shape[:-1], n)
        else:
            y = xq.float() @ q.weight.float().t()
        y = y * s * q.scale.float()
    elif x.is_cuda:  # prefill: one dequantized GEMM in the model dtype
        if dequant is not None and x.dtype in (torch.bfloat16, torch.float16):
            w = dequant(q.weight, q.scale, kind=q.kind, dtype=x.dtype, group=q.group, zero=q.zero,
                        int4_block=q.int4_block)
        else:
            w = dequantize(q).to(x.dtype)
        y = F.linear(x, w)
    else:
        y = x.float() @ dequantize(q).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def qdq_kv(x: torch.Tensor, scale: torch.Tensor | None, algo: str | None) -> torch.Tensor:
    """What a quantized KV cache gives back (the engine stores the rounded values in its dtype)."""
    if scale is None or not algo:
        return x
    return _qdq_kv(x, scale, algo).to(x.dtype)

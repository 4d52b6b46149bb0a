"""Prefill on CUDA: integer (int8 / packed int4) weights dequantized by a Triton kernel for one dense GEMM."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import W_INT4, W_INT8


@triton.jit
def _dequant(W, S, Z, OUT, N, swn, sgs_n, son, INT4: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
             HB: tl.constexpr, BN: tl.constexpr):
    """Program (pid, b): rows [pid*BN, +BN) x K columns [b*2*HB, (b+1)*2*HB) of OUT = q * scale (+ zero)
    in OUT's dtype. INT4: W is ``pack_int4_halves(q, 2*HB)`` (byte j of the block: k = j low, HB + j
    high); else int8 [N, K]. S: per row [N] (GROUP 0) or per group [N, K/GROUP] (row stride ``sgs_n``,
    each half-block inside one group), Z likewise (additive zero). Products in float32, as
    ``engine_quant.dequantize``."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_h = tl.arange(0, HB)
    k0 = tl.program_id(1) * 2 * HB
    if INT4:
        wb = tl.load(W + offs_n[:, None] * swn + (k0 // 2 + offs_h)[None, :], mask=nmask[:, None], other=0)
        lo = ((wb << 4).to(tl.int8) >> 4).to(tl.float32)
        hi = (wb.to(tl.int8) >> 4).to(tl.float32)
    else:
        lo = tl.load(W + offs_n[:, None] * swn + (k0 + offs_h)[None, :], mask=nmask[:, None], other=0).to(tl.float32)
        hi = tl.load(W + offs_n[:, None] * swn + (k0 + HB + offs_h)[None, :], mask=nmask[:, None],
                     other=0).to(tl.float32)
    if GROUP > 0:
        lo = lo * tl.load(S + offs_n * sgs_n + k0 // GROUP, mask=nmask, other=0.0)[:, None]
        hi = hi * tl.load(S + offs_n * sgs_n + (k0 + HB) // GROUP, mask=nmask, other=0.0)[:, None]
        if HAS_ZERO:
            lo = lo + tl.load(Z + offs_n * sgs_n + k0 // GROUP, mask=nmask, other=0.0)[:, None]
            hi = hi + tl.load(Z + offs_n * sgs_n + (k0 + HB) // GROUP, mask=nmask, other=0.0)[:, None]
    else:
        s = tl.load(S + offs_n, mask=nmask, other=0.0)[:, None]
        lo = lo * s
        hi = hi * s
    out = OUT + offs_n[:, None] * son + (k0 + offs_h)[None, :]
    tl.store(out, lo.to(OUT.dtype.element_ty), mask=nmask[:, None])
    tl.store(out + HB, hi.to(OUT.dtype.element_ty), mask=nmask[:, None])


def dequantize(w: torch.Tensor, scale: torch.Tensor, *, kind: int, dtype: torch.dtype, group: int = 0,
               zero: torch.Tensor | None = None, int4_block: int = 0) -> torch.Tensor:
    """[N, K] ``dtype`` weight = q * scale (+ zero) of an int8 [N, K] or int4 [N, K/2]
    (``pack_int4_halves(q, int4_block)``) weight with float32 per-row [N] or per-group [N, K/group]
    scales, in one pass (read the packed bytes, write the dense weight): what the prefill GEMM
    multiplies. Equal to ``engine_quant.dequantize(q).to(dtype)`` (the zero point may round once
    less: multiply-add)."""
    if kind not in (W_INT8, W_INT4) or (kind == W_INT4) != bool(int4_block):
        raise ValueError(f"dequantize takes int8 or int4 (with its packing block) weights, got kind {kind}")
    n = w.shape[0]
    k = w.shape[1] * 2 if kind == W_INT4 else w.shape[1]
    if w.stride(1) != 1 or scale.dtype != torch.float32 or (zero is not None and zero.dtype != torch.float32):
        raise ValueError("dequantize needs contiguous weight rows and float32 scales / zeros")
    want = n * (k // group) if group else n
    if scale.numel() != want or (zero is not None and (not group or zero.shape != scale.shape)):
        raise ValueError(f"{want} scales (and zeros of the same shape, grouped only) expected for [{n}, {k}], "
                         f"got {scale.numel()}")
    hb = int4_block // 2 if kind == W_INT4 else 256
    while kind == W_INT8 and hb > 1 and k % (2 * hb):
        hb //= 2
    if k % (2 * hb) or (group and (group % hb or hb > group)):
        raise ValueError(f"K={k} does not split into half-blocks of {hb} inside groups of {group}")
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    bn = max(1, min(64, 8192 // hb))
    _dequant[(triton.cdiv(n, bn), k // (2 * hb))](
        w, scale, zero if zero is not None else scale, out, n, w.stride(0), scale.stride(0) if group else 0,
        out.stride(0), INT4=kind == W_INT4, GROUP=group, HAS_ZERO=zero is not None, HB=hb, BN=bn, num_warps=4)
    return out


@torch.library.custom_op("kiln::dequantize", mutates_args=())
def dequantize_op(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, kind: int, dtype: torch.dtype,
                  group: int, int4_block: int) -> torch.Tensor:
    """``dequantize`` as an opaque operator for the compiled prefill graph."""
    return dequantize(w, scale, kind=kind, dtype=dtype, group=group, zero=zero, int4_block=int4_block)


@dequantize_op.register_fake
def _dequantize_fake(w, scale, zero, kind, dtype, group, int4_block):
    k = w.shape[1] * 2 if kind == W_INT4 else w.shape[1]
    return w.new_empty((w.shape[0], k), dtype=dtype)


def engine_dequantize(w: torch.Tensor, scale: torch.Tensor, *, kind: int, dtype: torch.dtype, group: int = 0,
                      zero: torch.Tensor | None = None, int4_block: int = 0) -> torch.Tensor:
    """What the engine's prefill calls (``dequantize``'s arguments), through ``kiln::dequantize``."""
    return dequantize_op(w, scale, zero, kind, dtype, group, int4_block)

"""Triton skinny GEMM of the engine's decode step on CUDA (imported only where Triton and a GPU exist).

* ``gemv``: ``x @ Wᵀ`` for a few rows (decode), with the weight bf16/fp16, FP8 (E4M3, per-tensor or
  per-row scales, activations quantized to E4M3 with their static scale inside the kernel, both
  operands multiplied as FP8 on the tensor cores with float32 accumulation, as TensorRT-LLM's FP8
  GEMM does), int8 weight-only or packed int4 weight-only (per-channel or per-group scales, optional
  zero points, optional per-input pre-quant scale as AWQ stores it). Weights are read once, in
  [rows, K] tiles along K: decode is bound by the bytes of the weights, and these are the fewest.

Everything here is checked against plain PyTorch in ``benchmarks/kernel_bench.py`` (on the GPU) and in
the GPU tests; the CPU engine does not use this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..engine_quant import int4_gemv_kernel
from .common import (  # noqa: F401
    GEMV_MAX_ROWS,
    W_BF16,
    W_FP8,
    W_INT4,
    W_INT8,
    _k_range,
    _split_buffers,
    _split_k_gather,
    _splits,
)
from .int4 import gemv_int4h, gemv_int4v

# ---------------------------------------------------------------------------------------------
# skinny GEMM (decode): y[M, N] = x[M, K] @ Wᵀ with W stored [N, K] in some format



@triton.jit
def _gemv(X, W, Y, WS, AS, PQS, Z, BIAS, PART, CNT,
          M, N, K, KS, sxm, swn, sym, sgs_n,
          KIND: tl.constexpr, PER_ROW_SCALE: tl.constexpr, GROUP: tl.constexpr, HAS_PQS: tl.constexpr,
          HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, DYN_TOKEN: tl.constexpr, FP8_UPCAST: tl.constexpr,
          INT4_HALVES: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          SPLIT: tl.constexpr):
    """One program: BN output columns for all M (<= BM) rows, looping over K in BK steps.
    KIND 0 bf16/fp16 W; 1 FP8 W + static per-tensor activation scale AS (x quantized to E4M3);
    2 int8 W; 3 int4 W packed two per byte along K ([N, K/2], even k in the low nibble).
    WS: per-tensor scalar (PER_ROW_SCALE=0), per-row [N] (GROUP=0) or per-group [N, K/GROUP];
    Z: additive per-group zero [N, K/GROUP] (AWQ with zero point); PQS: per-input scale [K] (AWQ).
    SPLIT > 1 (split-K): program (pid, s) covers K in [s*KS, (s+1)*KS), writes its float32 partial to
    PART[s]; the last of a column tile's SPLIT programs to arrive (counter CNT[pid], reset by it) adds
    the partials in split order — deterministic — and runs the epilogue."""
    pid = tl.program_id(0)
    k_lo, k_hi = _k_range(K, KS, SPLIT)
    offs_m = tl.arange(0, BM)
    offs_n = pid * BN + tl.arange(0, BN)
    nmask = offs_n < N
    mmask = offs_m < M
    acc = tl.zeros([BM, BN], tl.float32)
    a_row = tl.full([BM], 1.0, tl.float32)  # per-token activation scales (DYN_TOKEN)
    if KIND == 1:
        if DYN_TOKEN:  # per-token dynamic scale: amax of each row first (FP8_PER_CHANNEL_PER_TOKEN)
            amax = tl.zeros([BM], tl.float32)
            for k0 in range(0, K, BK):
                offs_k = k0 + tl.arange(0, BK)
                xa = tl.load(X + offs_m[:, None] * sxm + offs_k[None, :], mask=mmask[:, None], other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(xa.to(tl.float32)), 1))
            a_row = tl.maximum(amax / 448.0, 1e-12)
            inv_a = (1.0 / a_row)[:, None]
        else:
            inv_a = 1.0 / tl.load(AS)
    if INT4_HALVES:  # int4 packed per BK block: byte j holds k0 + j (low) and k0 + BK/2 + j (high)
        for k0 in range(k_lo, k_hi, BK):
            HB: tl.constexpr = BK // 2
            offs_lo = k0 + tl.arange(0, HB)
            x_lo = tl.load(X + offs_m[:, None] * sxm + offs_lo[None, :], mask=mmask[:, None], other=0.0)
            x_hi = tl.load(X + offs_m[:, None] * sxm + HB + offs_lo[None, :], mask=mmask[:, None], other=0.0)
            if HAS_PQS:
                x_lo = (x_lo.to(tl.float32) * tl.load(PQS + offs_lo)[None, :].to(tl.float32)).to(X.dtype.element_ty)
                x_hi = (x_hi.to(tl.float32) * tl.load(PQS + HB + offs_lo)[None, :].to(tl.float32)).to(X.dtype.element_ty)
            wb = tl.load(W + offs_n[:, None] * swn + (k0 // 2 + tl.arange(0, HB))[None, :], mask=nmask[:, None], other=0)
            w_lo = ((wb << 4).to(tl.int8) >> 4).to(tl.float32)
            w_hi = (wb.to(tl.int8) >> 4).to(tl.float32)
            if GROUP > 0:  # GROUP >= BK/2: each half lies in one group
                s_lo = tl.load(WS + offs_n[:, None] * sgs_n + (k0 // GROUP), mask=nmask[:, None], other=0.0)
                s_hi = tl.load(WS + offs_n[:, None] * sgs_n + ((k0 + HB) // GROUP), mask=nmask[:, None], other=0.0)
                w_lo = w_lo * s_lo.to(tl.float32)
                w_hi = w_hi * s_hi.to(tl.float32)
                if HAS_ZERO:
                    z_lo = tl.load(Z + offs_n[:, None] * sgs_n + (k0 // GROUP), mask=nmask[:, None], other=0.0)
                    z_hi = tl.load(Z + offs_n[:, None] * sgs_n + ((k0 + HB) // GROUP), mask=nmask[:, None], other=0.0)
                    w_lo = w_lo + z_lo.to(tl.float32)
                    w_hi = w_hi + z_hi.to(tl.float32)
            acc += tl.dot(x_lo, tl.trans(w_lo.to(X.dtype.element_ty)), input_precision=PREC)
            acc += tl.dot(x_hi, tl.trans(w_hi.to(X.dtype.element_ty)), input_precision=PREC)
    for k0 in range(k_lo, k_lo if INT4_HALVES else k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(X + offs_m[:, None] * sxm + offs_k[None, :], mask=mmask[:, None], other=0.0)
        if HAS_PQS:
            x = (x.to(tl.float32) * tl.load(PQS + offs_k)[None, :].to(tl.float32)).to(X.dtype.element_ty)
        if KIND == 3:
            offs_kh = k0 // 2 + tl.arange(0, BK // 2)
            wb = tl.load(W + offs_n[:, None] * swn + offs_kh[None, :], mask=nmask[:, None], other=0)
            lo = (wb << 4).to(tl.int8) >> 4
            hi = wb.to(tl.int8) >> 4
            w = tl.reshape(tl.join(lo, hi), (BN, BK))
        else:
            w = tl.load(W + offs_n[:, None] * swn + offs_k[None, :], mask=nmask[:, None], other=0.0)
        if KIND == 1:
            xq = tl.clamp(x.to(tl.float32) * inv_a, -448.0, 448.0).to(tl.float8e4nv)
            if FP8_UPCAST:  # E4M3 values are exact in bf16: the same products, bf16 tensor cores
                acc += tl.dot(xq.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
            else:
                acc += tl.dot(xq, tl.trans(w))
        elif KIND == 0:
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        else:
            wf = w.to(tl.float32)
            if GROUP > 0:  # w = q * scale (+ zero), one group per K tile (BK == GROUP)
                s = tl.load(WS + offs_n[:, None] * sgs_n + (k0 // GROUP), mask=nmask[:, None], other=0.0)
                wf = wf * s.to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(Z + offs_n[:, None] * sgs_n + (k0 // GROUP), mask=nmask[:, None], other=0.0)
                    wf = wf + z.to(tl.float32)
            acc += tl.dot(x, tl.trans(wf.to(X.dtype.element_ty)), input_precision=PREC)
    if SPLIT > 1:
        acc, last = _split_k_gather(acc, PART, CNT, offs_m, offs_n, nmask, N, BM, SPLIT)
        if last:
            _gemv_epilogue(acc, Y, WS, AS, BIAS, offs_m, offs_n, mmask, nmask, sym, a_row,
                           KIND, PER_ROW_SCALE, GROUP, HAS_BIAS, DYN_TOKEN)
    else:
        _gemv_epilogue(acc, Y, WS, AS, BIAS, offs_m, offs_n, mmask, nmask, sym, a_row,
                       KIND, PER_ROW_SCALE, GROUP, HAS_BIAS, DYN_TOKEN)




@triton.jit
def _gemv_epilogue(acc, Y, WS, AS, BIAS, offs_m, offs_n, mmask, nmask, sym, a_row,
                   KIND: tl.constexpr, PER_ROW_SCALE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DYN_TOKEN: tl.constexpr):
    """Scales (activation, weight per tensor / per row), bias, cast, store."""
    if KIND == 1:
        if DYN_TOKEN:
            acc = acc * a_row[:, None]
        else:
            acc = acc * tl.load(AS)
    if PER_ROW_SCALE:
        if GROUP == 0:
            acc = acc * tl.load(WS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    elif KIND != 0:
        acc = acc * tl.load(WS).to(tl.float32)
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * sym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def _gemv_tiles(n: int, k: int, kind: int, group: int) -> tuple[int, ...]:
    """(BN, BK, num_warps[, splits]), from benchmarks/kernel_bench.py --sweep on the H100 (batch 1,
    Llama 1B/8B matrices): 32 rows x 512 columns per step; 64 rows for very tall matrices (lm_head; FP8
    gate_up); FP8 and int8 per channel split K over matrices with few rows (``_splits``; fourth session:
    8B FP8 qkv 16.7 -> 14.5 us, o 12.5 -> 11.1, down 34.9 -> 27.8; 1B down 19.6 -> 11.4)."""
    if kind in (W_FP8, W_INT8) and not group:
        splits = _splits(n, k, 256)
        if splits > 1:
            return (64 if kind == W_FP8 and splits >= 4 else 32), 256, 4, splits
    bn = 64 if n >= 65536 or (kind == W_FP8 and n >= 16384) else 32
    bk = group if group else (256 if kind == W_FP8 and n >= 16384 else 512)
    while k % bk:
        bk //= 2
    return bn, bk, 4


def gemv(x: torch.Tensor, w: torch.Tensor, *, kind: int = W_BF16, w_scale: torch.Tensor | None = None,
         act_scale: torch.Tensor | None = None, group: int = 0, pre_quant_scale: torch.Tensor | None = None,
         zero: torch.Tensor | None = None, bias: torch.Tensor | None = None, dynamic_token: bool = False,
         int4_block: int = 0, fp8_upcast: bool = False, int4_fast: bool | str | None = None,
         out_dtype: torch.dtype | None = None, tiles: tuple[int, ...] | None = None) -> torch.Tensor:
    """y = x @ W_effectiveᵀ (+ bias) for x [M <= 16, K] (contiguous last dim). ``int4_block`` > 0: the
    int4 weight is packed by ``pack_int4_halves(q, int4_block)`` (else ``pack_int4_k``); with bf16/fp16
    activations it can run the bit-unpacking kernel: ``int4_fast`` None = where
    ``int4_fast_supported`` (one row: the CUDA-core kernel, ``int4_gemv_kernel``), True = always
    (bf16/fp16 x; ``tiles`` = (BN, blocks per step, warps[, stages[, splits]]) there), False = never;
    "vec" = the batch-1 CUDA-core kernel (``gemv_int4v``, per-channel only; ``tiles`` = (BN, bytes
    per step, warps, splits[, stages])). Otherwise ``tiles`` = (BN, BK, warps[, splits]). splits > 1 is split-K
    (more programs for matrices with few output columns)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = w.shape[0]
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"gemv handles at most {GEMV_MAX_ROWS} rows, got {M}")
    if x2.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("gemv needs contiguous rows")
    y_out = torch.empty((*lead, N), dtype=out_dtype or x.dtype, device=x.device)
    y = y_out.view(M, N)
    path = int4_gemv_kernel(x.dtype, M, w_scale, int4_block, group, pre_quant_scale, zero, int4_fast,
                            tiles is not None) if kind == W_INT4 else "convert"
    if path.startswith("cuda_cores"):
        gemv_int4v(x2, w, y, w_scale=w_scale, bias=bias, int4_block=int4_block, tiles=tiles,
                   words={"cuda_cores_bytes": False, "cuda_cores_words": True}.get(path), group=group,
                   pre_quant_scale=pre_quant_scale, zero=zero)
        return y_out
    if path == "unpack":
        gemv_int4h(x2, w, y, w_scale=w_scale, group=group, pre_quant_scale=pre_quant_scale, zero=zero, bias=bias,
                   int4_block=int4_block, tiles=tiles)
        return y_out
    bn, bk, warps, *rest = tiles or _gemv_tiles(N, K, kind, group)
    split = rest[0] if rest else 1
    if int4_block:
        bk = int4_block
    if split > 1 and (K % split or (K // split) % bk):
        raise ValueError(f"split-K {split} needs K={K} to split into whole {bk}-column steps")
    per_row = w_scale is not None and w_scale.numel() > 1
    dummy = x2
    tiles_n = triton.cdiv(N, bn)
    part, cnt = _split_buffers(x2, split, N, tiles_n)
    _gemv[(tiles_n, split)](
        x2, w, y, w_scale if w_scale is not None else dummy, act_scale if act_scale is not None else dummy,
        pre_quant_scale if pre_quant_scale is not None else dummy, zero if zero is not None else dummy,
        bias if bias is not None else dummy, part, cnt,
        M, N, K, K // split, x2.stride(0), w.stride(0), y.stride(0), w_scale.stride(0) if (w_scale is not None and per_row and group) else 0,
        KIND=kind, PER_ROW_SCALE=per_row, GROUP=group, HAS_PQS=pre_quant_scale is not None,
        HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, DYN_TOKEN=dynamic_token, FP8_UPCAST=fp8_upcast,
        INT4_HALVES=bool(int4_block),
        PREC="ieee" if x.dtype == torch.float32 else "tf32",  # float32 activations: exact float32 products
        BM=16, BN=bn, BK=bk, SPLIT=split, num_warps=warps,
        # float32 activations (the float32 engines and tests) take twice the shared memory per stage:
        # three stages of a 1024-wide int4 step needed 288 KB on the H100 (limit 227 KB)
        num_stages=1 if x.dtype == torch.float32 else 3,
    )
    return y_out


@torch.library.custom_op("kiln::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, w: torch.Tensor, kind: int, w_scale: torch.Tensor | None, act_scale: torch.Tensor | None,
            group: int, pre_quant_scale: torch.Tensor | None, zero: torch.Tensor | None, bias: torch.Tensor | None,
            dynamic_token: bool, int4_block: int) -> torch.Tensor:
    """``gemv`` as an opaque operator: torch.compile graphs call it without tracing the launch."""
    return gemv(x, w, kind=kind, w_scale=w_scale, act_scale=act_scale, group=group, pre_quant_scale=pre_quant_scale,
                zero=zero, bias=bias, dynamic_token=dynamic_token, int4_block=int4_block)


@gemv_op.register_fake
def _gemv_fake(x, w, kind, w_scale, act_scale, group, pre_quant_scale, zero, bias, dynamic_token, int4_block):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def engine_gemv(x: torch.Tensor, w: torch.Tensor, *, kind: int = W_BF16, w_scale=None, act_scale=None, group: int = 0,
                pre_quant_scale=None, zero=None, bias=None, dynamic_token: bool = False,
                int4_block: int = 0) -> torch.Tensor:
    """What the engine calls (same arguments as ``gemv``), through the ``kiln::gemv`` operator."""
    return gemv_op(x, w, kind, w_scale, act_scale, group, pre_quant_scale, zero, bias, dynamic_token, int4_block)

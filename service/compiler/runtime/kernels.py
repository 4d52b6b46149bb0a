"""Triton kernels for the engine's decode step on CUDA (imported only where Triton and a GPU exist).

* ``decode_attention``: one query token per row against the static KV cache, flash-decoding style.
  The KV span is cut into splits so that even batch 1 fills the GPU; each program handles one
  (row, KV head, split) and every query head of that KV head's GQA group at once (one K/V read for
  the group). The new token's K/V is written into the cache by the program whose split holds its
  position (no separate scatter kernel, no copy of the cache), and only slots <= pos[b] are read, so
  the work follows the true context length, not the captured span bucket. A second kernel combines
  the splits' partial softmax sums.
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

import functools

import torch
import triton
import triton.language as tl

from .engine_quant import (  # noqa: F401 (the layout and the int4 kernel rules)
    int4_block_for,
    int4_fast_supported,
    int4_gemv_kernel,
    pack_int4_halves,
    unpack_int4_halves,
)


# ---------------------------------------------------------------------------------------------
# decode attention
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decode_attn_split(Q, KN, VN, KC, VC, POS, OP, ML,
                       sqb, sqh, skb, skh, svb, svh,
                       scb, sch, scs, svcb, svch, svcs,
                       sob, soh, sos, smb, smh, sms,
                       split_len, sm_scale,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                       IEEE: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    pos = tl.load(POS + b)
    start = sp * split_len
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    heads = kvh * G + offs_g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    kn = tl.load(KN + b * skb + kvh * skh + offs_d)
    vn = tl.load(VN + b * svb + kvh * svh + offs_d)
    kbase = KC + b * scb + kvh * sch
    vbase = VC + b * svcb + kvh * svch
    if (pos >= start) & (pos < start + split_len):
        tl.store(kbase + pos * scs + offs_d, kn)
        tl.store(vbase + pos * svcs + offs_d, vn)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    end = tl.minimum(start + split_len, pos + 1)
    for s0 in range(start, end, BS):
        offs_s = s0 + tl.arange(0, BS)
        smask = offs_s < end
        k = tl.load(kbase + offs_s[:, None] * scs + offs_d[None, :], mask=smask[:, None], other=0.0)
        v = tl.load(vbase + offs_s[:, None] * svcs + offs_d[None, :], mask=smask[:, None], other=0.0)
        is_new = (offs_s == pos)[:, None]
        k = tl.where(is_new, kn[None, :], k)
        v = tl.where(is_new, vn[None, :], v)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(smask[None, :], s * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(OP + b * sob + heads[:, None] * soh + sp * sos + offs_d[None, :], acc, mask=gmask[:, None])
    tl.store(ML + b * smb + heads * smh + sp * sms, m_i, mask=gmask)
    tl.store(ML + b * smb + heads * smh + sp * sms + 1, l_i, mask=gmask)


@triton.jit
def _decode_attn_combine(OP, ML, OUT, sob, soh, sos, smb, smh, sms, s_outb,
                         NS: tl.constexpr, NSP: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, NSP)
    offs_d = tl.arange(0, D)
    mask = offs < NS
    m = tl.load(ML + b * smb + h * smh + offs * sms, mask=mask, other=float("-inf"))
    l_ = tl.load(ML + b * smb + h * smh + offs * sms + 1, mask=mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    total = tl.sum(l_ * w, 0)
    o = tl.load(OP + b * sob + h * soh + offs[:, None] * sos + offs_d[None, :], mask=mask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / total
    tl.store(OUT + b * s_outb + h * D + offs_d, out.to(OUT.dtype.element_ty))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(batch: int, kv_heads: int, span: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, slots per split): about two programs per SM, splits of >= 32 slots."""
    if device.type != "cuda":  # the Triton interpreter (tests of the kernels' arithmetic on CPU)
        sms = 8
    else:
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    ns = max(1, min(-(-2 * sms // (batch * kv_heads)), span // 32))
    split_len = -(-span // ns)
    split_len = -(-split_len // 16) * 16
    ns = -(-span // split_len)
    return ns, split_len


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
    """q [B, nh, d]; k_new, v_new [B, nkv, d]; caches [>=B, nkv, >=span, d] (last dim contiguous);
    pos [B] (each < span). Writes K/V at pos, returns softmax(q·Kᵀ/√d)·V over slots 0..pos[b] as
    [B, nh * d] in q's dtype."""
    B, nh, d = q.shape
    nkv = k_new.shape[1]
    g = nh // nkv
    for t in (q, k_new, v_new, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError("decode_attention needs the head dimension contiguous")
    ns, split_len = decode_splits(B, nkv, span, q.device)
    part = torch.empty((B, nh, ns, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((B, nh, ns, 2), dtype=torch.float32, device=q.device)
    out = torch.empty((B, nh * d), dtype=q.dtype, device=q.device)
    bs = 32 if d >= 128 else 64
    _decode_attn_split[(B, nkv, ns)](
        q, k_new, v_new, k_cache, v_cache, pos, part, ml,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        part.stride(0), part.stride(1), part.stride(2), ml.stride(0), ml.stride(1), ml.stride(2),
        split_len, 1.0 / (d ** 0.5),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, BS=bs, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    _decode_attn_combine[(B, nh)](
        part, ml, out, part.stride(0), part.stride(1), part.stride(2), ml.stride(0), ml.stride(1), ml.stride(2),
        out.stride(0), NS=ns, NSP=max(2, triton.next_power_of_2(ns)), D=d, num_warps=4,
    )
    return out


def decode_attention_supported(head_size: int, dtype: torch.dtype) -> bool:
    return head_size in (64, 128, 256) and dtype in (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------------------------------------
# skinny GEMM (decode): y[M, N] = x[M, K] @ Wᵀ with W stored [N, K] in some format
# ---------------------------------------------------------------------------------------------
W_BF16, W_FP8, W_INT8, W_INT4 = 0, 1, 2, 3


@triton.jit
def _k_range(K, KS, SPLIT: tl.constexpr):
    """The K range of program (pid, s): [s*KS, (s+1)*KS) under split-K, else [0, K) (the unsplit loop
    exactly as measured: constant bounds)."""
    if SPLIT > 1:
        k_lo = tl.program_id(1) * KS
        k_hi = k_lo + KS
    else:
        k_lo = 0
        k_hi = K
    return k_lo, k_hi


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
def _split_k_gather(acc, PART, CNT, offs_m, offs_n, nmask, N, BM: tl.constexpr, SPLIT: tl.constexpr):
    """Split-K: program (pid, s) writes its float32 partial to PART[s]; the last of column tile pid's
    SPLIT programs to arrive (counter CNT[pid], reset by it for the next call and CUDA graph replay)
    adds the partials in split order — deterministic — and gets (sum, True); the others (acc, False)."""
    pid = tl.program_id(0)
    part = PART + offs_m[:, None] * N + offs_n[None, :]
    tl.store(part + tl.program_id(1) * BM * N, acc, mask=nmask[None, :])
    tl.debug_barrier()  # every thread's partial is written before the release below
    last = tl.atomic_add(CNT + pid, 1, sem="acq_rel") == SPLIT - 1
    if last:
        acc = tl.load(part, mask=nmask[None, :], other=0.0, cache_modifier=".cg")
        for s in range(1, SPLIT):
            acc += tl.load(part + s * BM * N, mask=nmask[None, :], other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(CNT + pid, 0)
    return acc, last


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


def _int4_unpack_asm(high: bool, fp16: bool) -> str:
    """PTX for ``tl.inline_asm_elementwise(pack=4)``: four int8 bytes in -> the four signed low (or
    high) nibbles as bf16/fp16, without an int->float conversion instruction: the nibble, offset to
    unsigned (xor 8), is OR-ed into the mantissa of 128.0 (bf16) / 1024.0 (fp16) and the constant is
    subtracted with one packed FMA. Output register $0 holds elements 0 (low half) and 1, $1 elements
    2 and 3."""
    magic, one, neg = (0x64086408, 0x3C003C00, 0xE408E408) if fp16 else (0x43084308, 0x3F803F80, 0xC308C308)
    fma = "fma.rn.f16x2" if fp16 else "fma.rn.bf16x2"
    shift = "shr.b32 t0, t0, 4;\n shr.b32 t1, t1, 4;\n" if high else ""
    return (
        "{\n .reg .b32 t0, t1, z, m, k, o, n;\n"
        f" mov.b32 z, 0;\n mov.b32 m, 0x000F000F;\n mov.b32 k, {magic:#x};\n mov.b32 o, {one:#x};\n"
        f" mov.b32 n, {neg:#x};\n"
        " prmt.b32 t0, $2, z, 0x4140;\n prmt.b32 t1, $2, z, 0x4342;\n"
        f" {shift}"
        " lop3.b32 t0, t0, m, k, 0x6a;\n lop3.b32 t1, t1, m, k, 0x6a;\n"
        f" {fma} $0, t0, o, n;\n {fma} $1, t1, o, n;\n}}"
    )


_ASM = {(h, f): _int4_unpack_asm(h, f) for h in (False, True) for f in (False, True)}


@triton.jit
def _gemv_int4h(X, W, Y, WS, PQS, Z, BIAS, PART, CNT, M, N, K, KS, sxm, swn, sym, sgs_n,
                GROUP: tl.constexpr, HAS_PQS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLK: tl.constexpr, NB: tl.constexpr, ASM_LO: tl.constexpr, ASM_HI: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    """int4 weights packed by ``pack_int4_halves(q, BLK)`` ([N, K/2] int8; in each BLK of K, byte j holds
    k = j low and k = BLK/2 + j high), bf16/fp16 activations. The nibbles become bf16/fp16 values by
    bit arithmetic (``_int4_unpack_asm``); each half-block lies in one scale group, so the group
    scale (and zero: z * sum(x)) is applied to the [M, BN] partial product, not to every weight. NB
    packing blocks per loop step keep enough bytes in flight. SPLIT > 1: split-K as in ``_gemv``
    (program (pid, s) covers K in [s*KS, (s+1)*KS))."""
    pid = tl.program_id(0)
    k_lo, k_hi = _k_range(K, KS, SPLIT)
    offs_m = tl.arange(0, BM)
    offs_n = pid * BN + tl.arange(0, BN)
    nmask = offs_n < N
    mmask = offs_m < M
    HB: tl.constexpr = BLK // 2
    offs_h = tl.arange(0, HB)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(k_lo, k_hi, BLK * NB):
        for b in tl.static_range(NB):
            kb = k0 + b * BLK
            wb = tl.load(W + offs_n[:, None] * swn + (kb // 2 + offs_h)[None, :], mask=nmask[:, None], other=0)
            x_lo = tl.load(X + offs_m[:, None] * sxm + (kb + offs_h)[None, :], mask=mmask[:, None], other=0.0)
            x_hi = tl.load(X + offs_m[:, None] * sxm + (kb + HB + offs_h)[None, :], mask=mmask[:, None], other=0.0)
            if HAS_PQS:
                x_lo = (x_lo.to(tl.float32) * tl.load(PQS + kb + offs_h)[None, :].to(tl.float32)).to(X.dtype.element_ty)
                x_hi = (x_hi.to(tl.float32) * tl.load(PQS + kb + HB + offs_h)[None, :].to(tl.float32)).to(X.dtype.element_ty)
            w_lo = tl.inline_asm_elementwise(ASM_LO, "=r,=r,r", [wb], dtype=X.dtype.element_ty, is_pure=True, pack=4)
            w_hi = tl.inline_asm_elementwise(ASM_HI, "=r,=r,r", [wb], dtype=X.dtype.element_ty, is_pure=True, pack=4)
            d_lo = tl.dot(x_lo, tl.trans(w_lo))
            d_hi = tl.dot(x_hi, tl.trans(w_hi))
            if GROUP > 0:
                s_lo = tl.load(WS + offs_n * sgs_n + kb // GROUP, mask=nmask, other=0.0).to(tl.float32)
                s_hi = tl.load(WS + offs_n * sgs_n + (kb + HB) // GROUP, mask=nmask, other=0.0).to(tl.float32)
                acc += d_lo * s_lo[None, :] + d_hi * s_hi[None, :]
                if HAS_ZERO:
                    z_lo = tl.load(Z + offs_n * sgs_n + kb // GROUP, mask=nmask, other=0.0).to(tl.float32)
                    z_hi = tl.load(Z + offs_n * sgs_n + (kb + HB) // GROUP, mask=nmask, other=0.0).to(tl.float32)
                    acc += (tl.sum(x_lo.to(tl.float32), 1)[:, None] * z_lo[None, :]
                            + tl.sum(x_hi.to(tl.float32), 1)[:, None] * z_hi[None, :])
            else:
                acc += d_lo + d_hi
    _int4_finish(acc, Y, WS, BIAS, PART, CNT, offs_m, offs_n, M, N, sym, GROUP, HAS_BIAS, BM, SPLIT)


@triton.jit
def _int4_finish(acc, Y, WS, BIAS, PART, CNT, offs_m, offs_n, M, N, sym, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, SPLIT: tl.constexpr):
    """The int4 kernels' end: split-K gather (SPLIT > 1; only the last program goes on), then
    ``_int4h_epilogue`` on the [BM, BN] float32 sums ``acc`` of rows ``offs_m`` < M."""
    nmask = offs_n < N
    mmask = offs_m < M
    if SPLIT > 1:
        acc, last = _split_k_gather(acc, PART, CNT, offs_m, offs_n, nmask, N, BM, SPLIT)
        if last:
            _int4h_epilogue(acc, Y, WS, BIAS, offs_m, offs_n, mmask, nmask, sym, GROUP, HAS_BIAS)
    else:
        _int4h_epilogue(acc, Y, WS, BIAS, offs_m, offs_n, mmask, nmask, sym, GROUP, HAS_BIAS)


@triton.jit
def _int4h_epilogue(acc, Y, WS, BIAS, offs_m, offs_n, mmask, nmask, sym, GROUP: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    if GROUP == 0:
        acc = acc * tl.load(WS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * sym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def _int4h_tiles(n: int, k: int, block: int) -> tuple[int, ...]:
    """(BN, packing blocks per step, num_warps, num_stages[, splits]), from ``kernel_bench.py --sweep``
    on the H100 (Llama-3.2-1B / 3.1-8B matrices, batch 1): 64 rows for tall matrices, else 32;
    512-1024 K per step per group-128 block pair, 1-2 blocks of 1024 per channel; per channel,
    split-K for matrices with few rows (fourth session: 8B qkv 14.8 -> 13.3 us, o 11.9 -> 10.7,
    down 34.7 -> 28.3; 1B down 19.0 -> 10.9)."""
    tall = n >= 16384
    if block > 256:
        splits = _splits(n, k, block)
        if splits > 1:
            return (64 if splits >= 4 else 32), 1, 4, 1, splits
    nb = (2 if tall else 4) if block <= 256 else (1 if tall else 2)
    while nb > 1 and k % (block * nb):
        nb //= 2
    return (64 if tall else 32), nb, 4, 1


def _splits(n: int, k: int, step: int, rows: int = 16384) -> int:
    """Split-K factor for an [n, k] weight at batch <= 16: the most (<= 8) that keeps n x splits <= ``rows``
    (16384: up to ~512 programs of 32 rows: matrices with many rows already fill the GPU) and >= 512 K
    (and a whole number of ``step``s) per split. From the fourth session's sweep on the H100."""
    s = 8
    while s > 1 and (n * s > rows or k // s < max(512, step) or k % (step * s)):
        s //= 2
    return s


@triton.jit
def _gemv_int4v(X, W, Y, WS, BIAS, PART, CNT, N, K, KS, swn, sym,
                HAS_BIAS: tl.constexpr, BLK: tl.constexpr, CB: tl.constexpr, USE_ASM: tl.constexpr,
                ASM_LO: tl.constexpr, ASM_HI: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    """Batch 1, per-channel int4 packed by ``pack_int4_halves(q, BLK)``: products on the CUDA cores
    (a [BN, CB] float32 tile of partial products, reduced over K once at the end) instead of
    ``tl.dot``, which pads the single activation row to 16. CB bytes of each row per step (CB low and
    CB high nibbles); bf16/fp16 activations unpack by the inline PTX of ``_gemv_int4h`` (USE_ASM),
    float32 ones by shifts. SPLIT > 1: split-K as in ``_gemv``."""
    pid = tl.program_id(0)
    k_lo, k_hi = _k_range(K, KS, SPLIT)
    offs_n = pid * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_c = tl.arange(0, CB)
    HB: tl.constexpr = BLK // 2
    acc = tl.zeros([BN, CB], tl.float32)
    for k0 in range(k_lo, k_hi, BLK):
        for c in tl.static_range(HB // CB):
            j = k0 + c * CB
            wb = tl.load(W + offs_n[:, None] * swn + (k0 // 2 + c * CB + offs_c)[None, :], mask=nmask[:, None], other=0)
            x_lo = tl.load(X + j + offs_c).to(tl.float32)
            x_hi = tl.load(X + HB + j + offs_c).to(tl.float32)
            if USE_ASM:
                w_lo = tl.inline_asm_elementwise(ASM_LO, "=r,=r,r", [wb], dtype=X.dtype.element_ty, is_pure=True,
                                                 pack=4).to(tl.float32)
                w_hi = tl.inline_asm_elementwise(ASM_HI, "=r,=r,r", [wb], dtype=X.dtype.element_ty, is_pure=True,
                                                 pack=4).to(tl.float32)
            else:
                w_lo = ((wb << 4).to(tl.int8) >> 4).to(tl.float32)
                w_hi = (wb.to(tl.int8) >> 4).to(tl.float32)
            acc += w_lo * x_lo[None, :] + w_hi * x_hi[None, :]
    _int4_finish(tl.reshape(tl.sum(acc, 1), (1, BN)), Y, WS, BIAS, PART, CNT, tl.arange(0, 1), offs_n, 1, N, sym,
                 0, HAS_BIAS, 1, SPLIT)


@triton.jit
def _int4w_term(src, SHIFT: tl.constexpr, x):
    """One nibble of every int32 word in ``src`` (bits SHIFT..SHIFT+3, SHIFT <= 16) times ``x``, with
    no conversion instruction: the nibble, its sign bit flipped, lands in the mantissa of 2^23 (one
    and-xor), so the float is 2^23 + (s + 8) * 2^SHIFT for the signed nibble s; one subtraction
    leaves s * 2^SHIFT exactly, and ``x`` comes pre-scaled by 2^-SHIFT (exact)."""
    v = ((src & (15 << SHIFT)) ^ (0x4B000000 | (8 << SHIFT))).to(tl.float32, bitcast=True)
    return (v - (8388608.0 + 8.0 * (1 << SHIFT))) * x[None, :]


@triton.jit
def _int4w_x(X, PQS, offs, SCALE: tl.constexpr, HAS_PQS: tl.constexpr):
    """Activations at ``offs`` as float32 (times the AWQ pre-quant scale), times SCALE = 2^-shift."""
    x = tl.load(X + offs).to(tl.float32)
    if HAS_PQS:
        x = x * tl.load(PQS + offs).to(tl.float32)
    return x * SCALE


@triton.jit
def _gemv_int4w(X, W, Y, WS, PQS, Z, BIAS, PART, CNT, N, K, KS, swn, sym, sgs_n,
                GROUP: tl.constexpr, HAS_PQS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLK: tl.constexpr, CW: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    """``_gemv_int4v`` on int32 words (W: the packed bytes viewed as int32, ``swn`` in words): a word
    holds bytes j..j+3 of a half-block, so nibble 2m is k = j + m (low half) and 2m + 1 is
    k = BLK/2 + j + m. Each nibble becomes float32 by ``_int4w_term`` (and-xor, subtract, FMA: three
    instructions a weight, against unpacking to bf16, converting and FMA); nibbles above bit 19 are
    shifted down first (one shift for three). CW words of each row per step. GROUP > 0: group scales
    [N, K/GROUP] (row stride ``sgs_n``); each half-block lies in one group (``int4_block_for``), so the
    low and high halves' partial sums take their group's scale once per word, the additive zero
    (HAS_ZERO, same layout) is zero x sum(x) per group, and HAS_PQS multiplies x by the AWQ pre-quant
    scale as it is loaded."""
    pid = tl.program_id(0)
    k_lo, k_hi = _k_range(K, KS, SPLIT)
    offs_n = pid * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_w = tl.arange(0, CW)
    HB: tl.constexpr = BLK // 2
    acc = tl.zeros([BN, CW], tl.float32)
    accz = tl.zeros([BN], tl.float32)
    for k0 in range(k_lo, k_hi, BLK):
        for c in tl.static_range(HB // (4 * CW)):
            j = k0 + c * 4 * CW
            w = tl.load(W + offs_n[:, None] * swn + (k0 // 8 + c * CW + offs_w)[None, :], mask=nmask[:, None], other=0)
            ws = w >> 12
            ol = j + 4 * offs_w
            oh = HB + j + 4 * offs_w
            x0 = _int4w_x(X, PQS, ol, 1.0, HAS_PQS)
            x1 = _int4w_x(X, PQS, oh, 0.0625, HAS_PQS)
            x2 = _int4w_x(X, PQS, ol + 1, 0.00390625, HAS_PQS)
            x3 = _int4w_x(X, PQS, oh + 1, 0.000244140625, HAS_PQS)
            x4 = _int4w_x(X, PQS, ol + 2, 0.0000152587890625, HAS_PQS)
            x5 = _int4w_x(X, PQS, oh + 2, 0.00390625, HAS_PQS)
            x6 = _int4w_x(X, PQS, ol + 3, 0.000244140625, HAS_PQS)
            x7 = _int4w_x(X, PQS, oh + 3, 0.0000152587890625, HAS_PQS)
            if GROUP == 0:
                acc += _int4w_term(w, 0, x0)
                acc += _int4w_term(w, 4, x1)
                acc += _int4w_term(w, 8, x2)
                acc += _int4w_term(w, 12, x3)
                acc += _int4w_term(w, 16, x4)
                acc += _int4w_term(ws, 8, x5)
                acc += _int4w_term(ws, 12, x6)
                acc += _int4w_term(ws, 16, x7)
            else:
                t_lo = _int4w_term(w, 0, x0) + _int4w_term(w, 8, x2) + _int4w_term(w, 16, x4) + _int4w_term(ws, 12, x6)
                t_hi = _int4w_term(w, 4, x1) + _int4w_term(w, 12, x3) + _int4w_term(ws, 8, x5) + _int4w_term(ws, 16, x7)
                s_lo = tl.load(WS + offs_n * sgs_n + j // GROUP, mask=nmask, other=0.0).to(tl.float32)
                s_hi = tl.load(WS + offs_n * sgs_n + (HB + j) // GROUP, mask=nmask, other=0.0).to(tl.float32)
                acc += t_lo * s_lo[:, None] + t_hi * s_hi[:, None]
                if HAS_ZERO:  # x came scaled by 2^-shift: undo it for the sums (exact)
                    sum_lo = tl.sum(x0 + x2 * 256.0 + x4 * 65536.0 + x6 * 4096.0, 0)
                    sum_hi = tl.sum(x1 * 16.0 + x3 * 4096.0 + x5 * 256.0 + x7 * 65536.0, 0)
                    z_lo = tl.load(Z + offs_n * sgs_n + j // GROUP, mask=nmask, other=0.0).to(tl.float32)
                    z_hi = tl.load(Z + offs_n * sgs_n + (HB + j) // GROUP, mask=nmask, other=0.0).to(tl.float32)
                    accz += z_lo * sum_lo + z_hi * sum_hi
    _int4_finish(tl.reshape(tl.sum(acc, 1) + accz, (1, BN)), Y, WS, BIAS, PART, CNT, tl.arange(0, 1), offs_n, 1, N,
                 sym, GROUP, HAS_BIAS, 1, SPLIT)


def _int4v_tiles(n: int, k: int, block: int) -> tuple[int, ...]:
    """(BN, bytes per row per step, num_warps, splits[, stages]) for ``gemv_int4v``, from the sixth session's
    sweep on the H100 (batch 1, Llama 1B/8B matrices): 128 bytes per step, 4 warps, split-K by
    ``_splits``, and 16 rows per program where 32 would give fewer than 384 programs (8B down 30.2 ->
    27.1 us, 1B qkv / o a few percent)."""
    splits = _splits(n, k, block)
    bn = 16 if triton.cdiv(n, 32) * splits < 384 else 32
    return bn, min(128, block // 2), 4, splits


def _int4w_tiles(n: int, k: int, block: int) -> tuple[int, int, int, int]:
    """(BN, bytes per row per step, num_warps, splits) for the int32-word kernel, from the seventh
    session's sweep on the H100: 32 rows, 128 bytes, 4 warps, and twice ``_splits``' programs at most
    (n x splits <= 65536): 8B qkv / o split 4, gate_up 2; 1B down 8."""
    return 32, min(128, block // 2), 4, _splits(n, k, block, rows=65536)


def int4_words(n: int, k: int) -> bool:
    """Whether a batch-1 per-channel int4 GEMV of an [n, k] weight reads int32 words (``_gemv_int4w``)
    rather than bytes (``_gemv_int4v``). The seventh session's H100 sweep (best tiles of each, 8B and
    1B Llama matrices) found words faster for 4096 <= k <= 8192 (8B qkv 11.8 -> 11.1 us, o 9.0 -> 8.8,
    gate_up 38.0 -> 33.7; 1B down 9.1 -> 8.8) and bytes faster or equal elsewhere (8B down, k = 14336:
    26.7 vs 28.2; 1B qkv / o / gate_up, k = 2048)."""
    return 4096 <= k <= 8192


def gemv_int4v(x2: torch.Tensor, w: torch.Tensor, y: torch.Tensor, *, w_scale, bias, int4_block: int,
               tiles: tuple[int, ...] | None = None, words: bool | None = None, group: int = 0,
               pre_quant_scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> None:
    """Batch-1 int4 GEMV on the CUDA cores (``_gemv_int4v`` on bytes, ``_gemv_int4w`` on int32 words):
    ``gemv``'s choice for one bf16/fp16 activation row (``int4_batch1_kernel``), or ``int4_fast="vec"``
    / ``"word"``. Group scales, AWQ pre-quant scales and zeros: the word kernel only."""
    M, K = x2.shape
    N = w.shape[0]
    grouped = bool(group) or pre_quant_scale is not None or zero is not None
    want = N * (K // group) if group else N
    if M != 1 or w_scale is None or w_scale.numel() != want:
        raise ValueError(f"the CUDA-core int4 kernel takes one activation row and {want} scales, got {M} rows "
                         f"and {None if w_scale is None else w_scale.numel()} scales")
    if x2.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported activation dtype {x2.dtype}")
    if words is None:
        words = grouped or int4_words(N, K)
    if grouped and not words:
        raise ValueError("group scales, pre-quant scales and zeros need the word kernel (int4_fast='word')")
    bn, cb, warps, split, *rest = tiles or (_int4w_tiles if words else _int4v_tiles)(N, K, int4_block)
    stages = rest[0] if rest else 1
    if K % (int4_block * split) or (int4_block // 2) % cb:
        raise ValueError(f"K={K}: {split} splits of whole {int4_block}-blocks in steps of {cb} bytes do not fit")
    tiles_n = triton.cdiv(N, bn)
    part, cnt = _split_buffers(x2, split, N, tiles_n)
    if words:
        if cb % 4 or w.stride(0) % 4 or w.data_ptr() % 16:
            raise ValueError("the int32-word int4 kernel needs rows of whole, aligned 4-byte words")
        if group and (int4_block // 2) % cb:
            raise ValueError(f"group {group}: a step of {cb} bytes crosses a half-block of {int4_block // 2}")
        _gemv_int4w[(tiles_n, split)](
            x2, w.view(torch.int32), y, w_scale, x2 if pre_quant_scale is None else pre_quant_scale,
            x2 if zero is None else zero, bias if bias is not None else x2, part, cnt, N, K, K // split,
            w.stride(0) // 4, y.stride(0), w_scale.stride(0) if group else 0, GROUP=group,
            HAS_PQS=pre_quant_scale is not None, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
            BLK=int4_block, CW=cb // 4, BN=bn, SPLIT=split, num_warps=warps, num_stages=stages)
        return
    fp16 = x2.dtype == torch.float16
    _gemv_int4v[(tiles_n, split)](
        x2, w, y, w_scale, bias if bias is not None else x2, part, cnt, N, K, K // split, w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLK=int4_block, CB=cb, USE_ASM=x2.dtype != torch.float32,
        ASM_LO=_ASM[(False, fp16)], ASM_HI=_ASM[(True, fp16)], BN=bn, SPLIT=split, num_warps=warps, num_stages=stages)


def gemv_int4h(x2: torch.Tensor, w: torch.Tensor, y: torch.Tensor, *, w_scale, group, pre_quant_scale, zero, bias,
               int4_block: int, tiles: tuple[int, ...] | None = None) -> None:
    M, K = x2.shape
    N = w.shape[0]
    if x2.dtype not in (torch.bfloat16, torch.float16) or w_scale is None or w_scale.numel() == 1:
        raise ValueError("the bit-unpacking int4 kernel takes bf16/fp16 activations and per-row or per-group "
                         f"scales, got {x2.dtype} activations")
    fp16 = x2.dtype == torch.float16
    bn, nb, warps, *rest = tiles or _int4h_tiles(N, K, int4_block)
    stages = rest[0] if rest else 1
    split = rest[1] if len(rest) > 1 else 1
    if K % (int4_block * nb * split):
        raise ValueError(f"K={K} is not a multiple of {split} x {nb} int4 blocks of {int4_block}")
    tiles_n = triton.cdiv(N, bn)
    part, cnt = _split_buffers(x2, split, N, tiles_n)
    dummy = x2
    args = (x2, w, y, w_scale, pre_quant_scale if pre_quant_scale is not None else dummy,
            zero if zero is not None else dummy, bias if bias is not None else dummy, part, cnt,
            M, N, K, K // split, x2.stride(0), w.stride(0), y.stride(0), w_scale.stride(0) if group else 0)
    const = dict(GROUP=group, HAS_PQS=pre_quant_scale is not None, HAS_ZERO=zero is not None,
                 HAS_BIAS=bias is not None, BLK=int4_block, ASM_LO=_ASM[(False, fp16)], ASM_HI=_ASM[(True, fp16)],
                 BM=16)
    _gemv_int4h[(tiles_n, split)](*args, **const, BN=bn, NB=nb, SPLIT=split, num_warps=warps, num_stages=stages)


GEMV_MAX_ROWS = 16


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
        M, N, K, K // split, x2.stride(0), w.stride(0), y.stride(0), w_scale.stride(0) if (per_row and group) else 0,
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


# ---------------------------------------------------------------------------------------------
# prefill: integer weights dequantized for one dense GEMM
# ---------------------------------------------------------------------------------------------
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


_COUNTERS: dict = {}


def _split_buffers(x2: torch.Tensor, split: int, n: int, tiles_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 partials [split, 16, n], arrival counters) for split-K; ``x2`` twice (unused) without."""
    if split <= 1:
        return x2, x2
    return (torch.empty((split, GEMV_MAX_ROWS, n), dtype=torch.float32, device=x2.device),
            _split_counters(x2.device, tiles_n))


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for split-K, one per column tile, kept per device (each call's
    last program resets its counter, so they stay zero between calls and CUDA graph replays)."""
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    key = (device.type, index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf



def pack_int4_k(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7] -> int8 [N, K/2], k = 2j in the low nibble of byte j."""
    lo, hi = q[:, 0::2].to(torch.int16), q[:, 1::2].to(torch.int16)
    return ((lo & 0x0F) | ((hi & 0x0F) << 4)).to(torch.uint8).view(torch.int8).contiguous()


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

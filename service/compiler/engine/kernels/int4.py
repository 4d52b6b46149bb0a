"""Triton int4 weight-only GEMV kernels for one to 16 rows (``gemv`` dispatches here): the bit-unpacking
tensor-core kernel (``_gemv_int4h``) and the batch-1 CUDA-core kernels on bytes (``_gemv_int4v``) and
int32 words (``_gemv_int4w``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _k_range, _split_buffers, _split_k_gather, _splits


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


def pack_int4_k(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7] -> int8 [N, K/2], k = 2j in the low nibble of byte j."""
    lo, hi = q[:, 0::2].to(torch.int16), q[:, 1::2].to(torch.int16)
    return ((lo & 0x0F) | ((hi & 0x0F) << 4)).to(torch.uint8).view(torch.int8).contiguous()

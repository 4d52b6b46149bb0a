"""Check and time the engine's Triton decode kernels against PyTorch (GPU only).

    PYTHONPATH=. python3 benchmarks/kernel_bench.py [--sweep] [--out DIR]

1. Correctness on fresh random inputs (outputs poisoned first): decode attention vs float64 softmax
   attention (bf16 and float32), every ``gemv`` weight format vs the dequantized float32 product
   (FP8 vs ``quantization.fp8.fp8_linear``, i.e. ``torch._scaled_mm`` on the GPU).
2. Timing, each variant captured in a CUDA graph of many calls over rotating weight copies (bigger
   than L2), medians of replays: decode attention (index_put K/V + SDPA, as the engine did, vs the
   Triton kernel) for the Llama-3.2-1B and 3.1-8B shapes, and the decode GEMVs of both shapes at batch
   1 (cuBLAS bf16 vs Triton bf16 / FP8 / int8 / int4 per-channel / int4 group-128), in GB/s of weight.
   Kind ``int4vf``: the batch-1 int4 kernel on the CUDA cores (``gemv_int4v``; the engine's choice for
   one row of per-channel W4A16 since the sixth session's sweep); ``int4wf``: its variant on int32
   words (``_gemv_int4w``: nibbles to float32 by and-xor + subtract, no bf16 stage).
3. ``--prefill M``: one prefill linear of M rows, bf16 cuBLAS vs integer weights dequantized for the
   same GEMM (the Inductor-compiled torch dequantization the prefill graph had, and the one-pass
   Triton ``kernels.dequantize``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F

from service.compiler.engine import engine_quant as EQ
from service.compiler.engine import kernels as K
from service.compiler.quantization.fp8 import fp8_linear
from service.compiler.quantization.weight_only import (
    dequantize_groupwise,
    quantize_groupwise,
    quantize_per_channel,
)

SHAPES = {  # name: (hidden, heads, kv_heads, head, inter, vocab)
    "1b": (2048, 32, 8, 64, 8192, 128256),
    "8b": (4096, 32, 8, 128, 14336, 128256),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm())


def check_attention(results: list) -> None:
    for dt in (torch.bfloat16, torch.float32):
        for B, nh, nkv, d, S in [(1, 32, 8, 128, 512), (3, 32, 8, 64, 256), (2, 9, 3, 64, 2304), (4, 8, 8, 128, 1024)]:
            dev = "cuda"
            kc = torch.randn(B + 1, nkv, S + 64, d, device=dev).to(dt)
            vc = torch.randn(B + 1, nkv, S + 64, d, device=dev).to(dt)
            q, kn, vn = (torch.randn(B, n, d, device=dev).to(dt) for n in (nh, nkv, nkv))
            pos = torch.randint(0, S, (B,), device=dev)
            pos[0] = S - 1
            ref_k, ref_v = kc.clone(), vc.clone()
            for b in range(B):
                ref_k[b, :, pos[b]] = kn[b]
                ref_v[b, :, pos[b]] = vn[b]
            g = nh // nkv
            ref = torch.empty(B, nh, d, dtype=torch.float64, device=dev)
            for b in range(B):
                p = int(pos[b]) + 1
                kk = ref_k[b, :, :p].double().repeat_interleave(g, 0)
                vv = ref_v[b, :, :p].double().repeat_interleave(g, 0)
                s = torch.einsum("hd,hsd->hs", q[b].double(), kk) / d ** 0.5
                ref[b] = torch.einsum("hs,hsd->hd", s.softmax(-1), vv)
            out = K.decode_attention(q, kn, vn, kc[:B, :, :S], vc[:B, :, :S], pos, S)
            torch.cuda.synchronize()
            cache_ok = torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
            err = rel(out.reshape(B, nh, d), ref)
            bound = 2e-2 if dt == torch.bfloat16 else 1e-5
            results.append({"check": "decode_attention", "dtype": str(dt), "shape": [B, nh, nkv, d, S],
                             "rel_err": err, "cache_written": cache_ok, "ok": cache_ok and err < bound})


def make_weights(n: int, k: int, kind: str, device="cuda") -> dict:
    w = torch.randn(n, k, device=device) * 0.02
    if kind == "bf16":
        wb = w.bfloat16()
        return {"args": (wb,), "kw": {}, "ref_w": wb.float(), "bytes": wb.numel() * 2}
    if kind == "fp8":
        s = (w.abs().max() / 448).reshape(1)
        w8 = (w / s).to(torch.float8_e4m3fn)
        return {"args": (w8,), "kw": {"kind": K.W_FP8, "w_scale": s}, "fp8": (w8, s), "bytes": w8.numel()}
    if kind == "int8":
        q, s = quantize_per_channel(w, 8, torch.bfloat16)
        return {"args": (q,), "kw": {"kind": K.W_INT8, "w_scale": s}, "ref_w": q.float() * s.float()[:, None],
                "bytes": q.numel() + s.numel() * 2}
    if kind == "int4":
        q, s = quantize_per_channel(w, 4, torch.bfloat16)
        p = K.pack_int4_k(q)
        return {"args": (p,), "kw": {"kind": K.W_INT4, "w_scale": s}, "ref_w": q.float() * s.float()[:, None],
                "bytes": p.numel() + s.numel() * 2}
    if kind == "int4g128":
        q, s, z = quantize_groupwise(w, 128, torch.bfloat16)
        p = K.pack_int4_k(q)
        return {"args": (p,), "kw": {"kind": K.W_INT4, "w_scale": s, "group": 128},
                "ref_w": dequantize_groupwise(q, s, z, 128), "bytes": p.numel() + s.numel() * 2}
    if kind == "fp8u":  # FP8 weights and activations, products on bf16 tensor cores
        d = make_weights(n, k, "fp8", device)
        d["kw"]["fp8_upcast"] = True
        return d
    if kind == "fp8dyn":  # per-channel weights, per-token dynamic activations
        s = (w.abs().amax(1) / 448).float()
        w8 = (w / s[:, None]).to(torch.float8_e4m3fn)
        return {"args": (w8,), "kw": {"kind": K.W_FP8, "w_scale": s, "dynamic_token": True}, "fp8dyn": (w8, s),
                "bytes": w8.numel()}
    if kind in ("int4h", "int4g128h", "int4hf", "int4g128hf", "int4g128zf", "int4vf", "int4wf", "int4g128wf",
                "int4g128zwf"):
        # *h: packed in halves (the engine's layout), older conversion kernel; *hf: bit-unpacking kernel;
        # int4g128zf: + AWQ zero point and pre-quant scale; int4vf: batch-1 CUDA-core kernel; int4wf: its
        # int32-word variant; int4g128wf / int4g128zwf: the word kernel with group scales (+ zero, pre-quant scale)
        group = 128 if "g128" in kind else 0
        zero = pqs = None
        if group:
            q, s, z = quantize_groupwise(w, 128, torch.bfloat16, zero_point=kind in ("int4g128zf", "int4g128zwf"))
            ref = dequantize_groupwise(q, s, z, 128)
            if kind in ("int4g128zf", "int4g128zwf"):
                zero = z.to(torch.bfloat16)
                ref = dequantize_groupwise(q, s, zero, 128)
                pqs = (torch.rand(k, device=device) + 0.5).to(torch.bfloat16)
                ref = ref * pqs.float()[None, :]
        else:
            q, s = quantize_per_channel(w, 4, torch.bfloat16)
            ref = q.float() * s.float()[:, None]
        blk = K.int4_block_for(k, group)
        p = K.pack_int4_halves(q, blk)
        kw = {"kind": K.W_INT4, "w_scale": s, "group": group, "int4_block": blk,
              "int4_fast": "vec" if kind == "int4vf" else "word" if kind.endswith("wf") else kind.endswith("f")}
        if zero is not None:
            kw.update(zero=zero, pre_quant_scale=pqs)
        return {"args": (p,), "kw": kw, "ref_w": ref, "bytes": p.numel() + s.numel() * 2}
    raise ValueError(kind)


def probe_int4_unpack(results: list) -> None:
    """Which value each output element of the bit-unpacking asm holds (bytes 0..63, both nibbles)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(W, LO, HI, ASM_LO: tl.constexpr, ASM_HI: tl.constexpr):
        o = tl.arange(0, 64)
        wb = tl.load(W + o)
        tl.store(LO + o, tl.inline_asm_elementwise(ASM_LO, "=r,=r,r", [wb], dtype=tl.bfloat16, is_pure=True, pack=4))
        tl.store(HI + o, tl.inline_asm_elementwise(ASM_HI, "=r,=r,r", [wb], dtype=tl.bfloat16, is_pure=True, pack=4))

    q = torch.randint(-8, 8, (2, 64), device="cuda", dtype=torch.int16)
    wb = ((q[0] & 0xF) | ((q[1] & 0xF) << 4)).to(torch.uint8).view(torch.int8)
    lo = torch.empty(64, device="cuda", dtype=torch.bfloat16)
    hi = torch.empty_like(lo)
    probe[(1,)](wb, lo, hi, ASM_LO=K._ASM[(False, False)], ASM_HI=K._ASM[(True, False)])
    ok = torch.equal(lo.float(), q[0].float()) and torch.equal(hi.float(), q[1].float())
    results.append({"check": "int4_unpack_probe", "ok": ok, "expect_lo": q[0, :8].tolist(),
                    "got_lo": lo[:8].float().tolist(), "expect_hi": q[1, :8].tolist(), "got_hi": hi[:8].float().tolist()})


def check_gemv(results: list) -> None:
    for kind in ("bf16", "fp8", "fp8u", "fp8dyn", "int8", "int4", "int4g128", "int4h", "int4g128h", "int4hf",
                 "int4g128hf", "int4g128zf", "int4vf", "int4wf", "int4g128wf", "int4g128zwf"):
        for M, N, Kd in [(1, 4096, 4096), (3, 1000, 2048), (16, 6144, 4096)]:
            if kind in WORDS and M != 1:  # batch 1 only
                continue
            wt = make_weights(N, Kd, kind)
            x = torch.randn(M, Kd, device="cuda").bfloat16()
            if kind == "fp8dyn":
                w8, s = wt["fp8dyn"]
                tok = (x.float().abs().amax(1, keepdim=True) / 448).clamp_min(1e-12)
                xq = (x.float() / tok).clamp(-448, 448).to(torch.float8_e4m3fn).float()
                ref = (xq @ w8.float().t()) * tok * s
                out = K.gemv(x, *wt["args"], **wt["kw"])
            elif kind in ("fp8", "fp8u"):
                a_s = (x.float().abs().max() / 448).reshape(1)
                w8, s = wt["fp8"]
                # the E4M3 roundings of both operands, float32 products (_scaled_mm needs N % 16 == 0)
                xq = (x.float() / a_s).clamp(-448, 448).to(torch.float8_e4m3fn).float()
                ref = (xq @ w8.float().t()) * a_s * s
                if N % 16 == 0:
                    results.append({"check": "scaled_mm_vs_simulation", "shape": [M, N, Kd],
                                    "rel_err": rel(fp8_linear(x.float(), w8, s, a_s), ref), "ok": True})
                out = K.gemv(x, *wt["args"], act_scale=a_s, **wt["kw"])
            else:
                ref = x.float() @ wt["ref_w"].t()
                out = K.gemv(x, *wt["args"], **wt["kw"])
            err = rel(out, ref)
            results.append({"check": f"gemv_{kind}", "shape": [M, N, Kd], "rel_err": err, "ok": err < 1e-2})
            if kind == "int4vf":  # software pipelining reorders loads, not arithmetic: the same bits
                for tiles in [(bn, 128, 4, sp, st) for bn, sp in ((32, 1), (16, 2)) for st in (1, 2, 3, 4)]:
                    try:
                        y = K.gemv(x, *wt["args"], tiles=tiles, **wt["kw"])
                        one = K.gemv(x, *wt["args"], tiles=tiles[:4], **wt["kw"])
                        results.append({"check": "gemv_int4vf_stages", "tiles": list(tiles), "shape": [M, N, Kd],
                                        "rel_err": rel(y, ref), "ok": torch.equal(y, one)})
                    except Exception as exc:
                        results.append({"check": "gemv_int4vf_stages", "tiles": list(tiles), "ok": False,
                                        "error": repr(exc)[:500]})
            try:
                check_split(results, kind, wt, x, ref, a_s if kind in ("fp8", "fp8u") else None)
            except Exception as exc:  # report, keep going with the other checks
                results.append({"check": f"gemv_{kind}_splitk", "shape": [M, N, Kd], "ok": False,
                                "error": repr(exc)[:2000]})


def check_split(results: list, kind: str, wt: dict, x: torch.Tensor, ref: torch.Tensor, a_s) -> None:
    """Split-K: within the bound of the reference, the same bits on every call and in CUDA graph
    replays (the arrival counters reset themselves; the partials are added in a fixed order)."""
    M, Kd = x.shape
    extra = {"act_scale": a_s} if a_s is not None else {}
    for sp in (8, 4, 2):
        if kind in INT4F:
            blk = wt["kw"]["int4_block"]
            tiles = (32, 1, 4, 1, sp) if Kd % (blk * sp) == 0 else None
        elif kind in WORDS:
            blk = wt["kw"]["int4_block"]
            tiles = (32, 128, 4, sp) if Kd % (blk * sp) == 0 else None
        elif kind in ("bf16", "fp8", "fp8dyn", "int8"):
            tiles = (32, 256, 4, sp) if Kd % (256 * sp) == 0 else None
        else:
            return
        if tiles:
            break
    else:
        return

    def f():
        return K.gemv(x, *wt["args"], tiles=tiles, **wt["kw"], **extra)
    outs = [f() for _ in range(3)]
    captured: list = []
    g = capture([lambda: captured.append(f())])
    gout = captured[-1]  # the output tensor the graph writes on every replay
    replays = []
    for _ in range(3):
        gout.fill_(float("nan"))
        g.replay()
        replays.append(gout.clone())
    torch.cuda.synchronize()
    err = rel(outs[0], ref)
    same = all(torch.equal(o, outs[0]) for o in outs + replays)
    results.append({"check": f"gemv_{kind}_splitk", "tiles": list(tiles), "shape": [M, wt["args"][0].shape[0], Kd],
                    "rel_err": err, "same_bits_calls_and_replays": same, "ok": err < 1e-2 and same})


PREFILL_KINDS = {"int4": (K.W_INT4, 0, False), "int4g128z": (K.W_INT4, 128, True), "int8": (K.W_INT8, 0, False)}


def engine_qlinear(n: int, k: int, kind: str, device="cuda") -> EQ.QLinear:
    """An engine QLinear (float32 scales, int4 packed in halves) of a random [n, k] weight."""
    wkind, group, zero_point = PREFILL_KINDS[kind]
    w = torch.randn(n, k, device=device) * 0.02
    zero = None
    if group:
        q, s, zero = quantize_groupwise(w, group, torch.float32, zero_point=zero_point)
    else:
        q, s = quantize_per_channel(w, 8 if wkind == K.W_INT8 else 4, torch.float32)
    blk = K.int4_block_for(k, group) if wkind == K.W_INT4 else 0
    packed = K.pack_int4_halves(q, blk) if blk else q
    return EQ.QLinear(packed, s.float().contiguous(), None, None, zero, wkind, group, False, blk)


def check_dequantize(results: list) -> None:
    """The prefill's one-pass dequantization (``kernels.dequantize``) against the engine's torch
    reference (``engine_quant.dequantize(q).to(dtype)``): equal bits without a zero point; with one
    the Triton multiply-add may round once less (a bf16 ulp at most)."""
    for kind in PREFILL_KINDS:
        for n, k in [(4096, 4096), (1000, 2048), (96, 14336)]:
            q = engine_qlinear(n, k, kind)
            for dtype in (torch.bfloat16, torch.float16):
                ref = EQ.dequantize(q).to(dtype)
                got = K.dequantize(q.weight, q.scale, kind=q.kind, dtype=dtype, group=q.group, zero=q.zero,
                                   int4_block=q.int4_block)
                err = rel(got, ref)
                ok = torch.equal(got, ref) if q.zero is None else err < 1e-2
                results.append({"check": f"dequantize_{kind}_{str(dtype)[6:]}", "shape": [n, k], "rel_err": err,
                                "ok": bool(ok)})


def time_prefill(rows: list, shape: str, kinds: list[str], M: int) -> None:
    """One prefill linear of M rows: bf16 cuBLAS against an integer weight dequantized for the same GEMM,
    by the engine's earlier path (``engine_quant.dequantize`` compiled by Inductor, dynamic shapes, as
    in the prefill graph) and by the one-pass Triton kernel (``kernels.dequantize``)."""
    hidden, nh, nkv, d, inter, vocab = SHAPES[shape]
    mats = {"qkv": ((nh + 2 * nkv) * d, hidden), "o": (hidden, nh * d), "gate_up": (2 * inter, hidden),
            "down": (hidden, inter)}
    old = torch.compile(lambda x, q: F.linear(x, EQ.dequantize(q).to(x.dtype)), dynamic=True)
    for name, (N, Kd) in mats.items():
        copies = max(2, min(8, int(400e6 // (N * Kd * 2))))
        x = torch.randn(M, Kd, device="cuda").bfloat16()
        row = {"bench": "prefill_linear", "shape": shape, "matrix": name, "N": N, "K": Kd, "M": M}
        ws = [torch.randn(N, Kd, device="cuda").bfloat16() for _ in range(copies)]
        row["bf16_us"] = graph_time([lambda w=w, x=x: F.linear(x, w) for w in ws]) * 1e6
        del ws
        for kind in kinds:
            qs = [engine_qlinear(N, Kd, kind) for _ in range(copies)]
            row[f"{kind}_inductor_us"] = graph_time([lambda q=q, x=x: old(x, q) for q in qs]) * 1e6
            row[f"{kind}_triton_us"] = graph_time([lambda q=q, x=x: F.linear(x, K.dequantize(
                q.weight, q.scale, kind=q.kind, dtype=x.dtype, group=q.group, zero=q.zero,
                int4_block=q.int4_block)) for q in qs]) * 1e6
            del qs
        rows.append(row)
        torch.cuda.empty_cache()


def capture(fns: list) -> torch.cuda.CUDAGraph:
    """A CUDA graph of every fn in ``fns`` in order (after one warm-up call each on a side stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g


def graph_time(fns: list, replays: int = 20) -> float:
    """Median seconds of one call, from a CUDA graph of every fn in ``fns`` (rotating inputs)."""
    g = capture(fns)
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(fns))
    return statistics.median(times)


def time_attention(rows: list, shape: str, span: int = 512, pos: int = 383, batch: int = 1) -> None:
    hidden, nh, nkv, d, _, _ = SHAPES[shape]
    n = 32
    caches = [(torch.randn(batch, nkv, span, d, device="cuda").bfloat16(),
               torch.randn(batch, nkv, span, d, device="cuda").bfloat16()) for _ in range(n)]
    q = torch.randn(batch, nh, d, device="cuda").bfloat16()
    kn = torch.randn(batch, nkv, d, device="cuda").bfloat16()
    vn = torch.randn(batch, nkv, d, device="cuda").bfloat16()
    p = torch.full((batch,), pos, device="cuda")
    slots = torch.arange(span, device="cuda")
    mask = torch.zeros((), dtype=torch.bfloat16, device="cuda").masked_fill(
        slots[None, :] > p[:, None], float("-inf"))[:, None, None, :]
    rows_i = torch.arange(batch, device="cuda")

    def sdpa(kc, vc):
        kc[rows_i, :, p] = kn
        vc[rows_i, :, p] = vn
        return F.scaled_dot_product_attention(q.view(batch, nkv, nh // nkv, d), kc, vc, attn_mask=mask)

    t_sdpa = graph_time([lambda kc=kc, vc=vc: sdpa(kc, vc) for kc, vc in caches])
    t_tri = graph_time([lambda kc=kc, vc=vc: K.decode_attention(q, kn, vn, kc, vc, p, span) for kc, vc in caches])
    rows.append({"bench": "decode_attention", "shape": shape, "batch": batch, "span": span, "pos": pos,
                 "sdpa_us": t_sdpa * 1e6, "triton_us": t_tri * 1e6, "speedup": t_sdpa / t_tri})


INT4F = ("int4hf", "int4g128hf", "int4g128zf")
WORDS = ("int4vf", "int4wf", "int4g128wf", "int4g128zwf")  # the batch-1 CUDA-core kernels


def sweep_configs(kind: str, Kd: int, blk: int, split_only: bool, stages: tuple[int, ...] = (1,)) -> list[tuple]:
    """Tile configs to try for one kind (``gemv``'s ``tiles``); ``split_only``: the split-K candidates
    and their unsplit twins (32/64 rows, 4 warps, one stage); ``stages``: software-pipelining depths
    to try (``int4vf`` only)."""
    splits = (2, 4, 8)
    if kind in WORDS:  # (BN, bytes per row per step, warps, splits, stages)
        return [(bn, cb, nw, sp, st) for bn in (16, 32, 64) for cb in (64, 128, 256) for nw in (4, 8)
                for sp in (1, *splits) for st in stages if Kd % (blk * sp) == 0 and (blk // 2) % cb == 0
                and (not split_only or (nw == 4 and cb == 128 and bn < 64))]
    if kind in INT4F:  # (BN, packing blocks per step, warps, stages[, splits])
        split = [(bn, nb, 4, 1, sp) for bn in (32, 64) for nb in (1, 2) for sp in splits if Kd % (blk * nb * sp) == 0]
        if split_only:
            return [(bn, nb, 4, 1) for bn in (32, 64) for nb in (1, 2) if Kd % (blk * nb) == 0] + split
        return [(bn, nb, nw, st) for bn in (16, 32, 64) for nb in (1, 2, 4) for nw in (4, 8) for st in (1, 3)
                if Kd % (blk * nb) == 0] + split
    if kind in ("int4h", "int4g128h"):  # (BN, -, warps): BK is the packing block
        return [] if split_only else [(bn, 0, nw) for bn in (16, 32, 64, 128) for nw in (4, 8)]
    # (BN, BK, warps[, splits])
    split = ([(bn, bk, 4, sp) for bn in (32, 64) for bk in (256, 512) for sp in splits if Kd % (bk * sp) == 0]
             if kind in ("bf16", "fp8", "fp8dyn", "int8") else [])
    bks = (128,) if kind == "int4g128" else (128, 256, 512)  # group 128: one group per K step
    if split_only:
        return [(bn, bk, 4) for bn in (32, 64) for bk in bks if bk != 128] + split
    return [(bn, bk, nw) for bn in (16, 32, 64) for bk in bks for nw in (4, 8)] + split


def time_gemv(rows: list, shape: str, kinds: list[str], M: int = 1, sweep: bool = False,
              sweep_kinds: list[str] | None = None, matrices: list[str] | None = None,
              split_only: bool = False, stages: tuple[int, ...] = (1,)) -> None:
    hidden, nh, nkv, d, inter, vocab = SHAPES[shape]
    mats = {"qkv": ((nh + 2 * nkv) * d, hidden), "o": (hidden, nh * d), "gate_up": (2 * inter, hidden),
            "down": (hidden, inter), "lm_head": (vocab, hidden)}
    for name, (N, Kd) in mats.items():
        if matrices and name not in matrices:
            continue
        per = N * Kd * 2
        copies = max(2, min(16, int(400e6 // per)))
        x = torch.randn(M, Kd, device="cuda").bfloat16()
        a_s = torch.tensor([0.01], device="cuda")
        row = {"bench": "gemv", "shape": shape, "matrix": name, "N": N, "K": Kd, "M": M}
        ws = [make_weights(N, Kd, "bf16") for _ in range(copies)]
        t = graph_time([lambda w=w, x=x: F.linear(x, w["args"][0]) for w in ws])
        row["cublas_bf16_us"] = t * 1e6
        row["cublas_bf16_GBps"] = per / t / 1e9
        del ws
        for kind in kinds:
            ws = [make_weights(N, Kd, kind) for _ in range(copies)]
            extra = {"act_scale": a_s} if kind in ("fp8", "fp8u") else {}
            configs = [None]
            if sweep and (not sweep_kinds or kind in sweep_kinds):
                configs += sweep_configs(kind, Kd, ws[0]["kw"].get("int4_block", 0), split_only, stages)
            best = None
            for cfg in configs:
                try:
                    t = graph_time([lambda w=w, x=x, cfg=cfg, extra=extra: K.gemv(x, *w["args"], tiles=cfg, **w["kw"], **extra)
                                    for w in ws])
                except Exception as exc:  # a tile config the compiler refuses
                    row.setdefault("errors", []).append(f"{kind} {cfg}: {exc!r}"[:200])
                    continue
                if cfg is not None:
                    row.setdefault(f"{kind}_sweep", []).append([list(cfg), round(t * 1e6, 2)])
                if cfg is None:
                    row[f"{kind}_us"] = t * 1e6
                    row[f"{kind}_GBps"] = ws[0]["bytes"] / t / 1e9
                if best is None or t < best[0]:
                    best = (t, cfg)
            if sweep and best:
                row[f"{kind}_best"] = {"us": best[0] * 1e6, "tiles": best[1]}
            del ws
        rows.append(row)
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also try every tile config per matrix")
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--kinds", default="bf16,fp8,int8,int4,int4g128")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sweep-kinds", default="", help="sweep only these kinds (default: all)")
    ap.add_argument("--matrices", default="", help="only these matrices (qkv,o,gate_up,down,lm_head)")
    ap.add_argument("--split-only", action="store_true",
                    help="sweep only split-K configs and their unsplit twins (32/64 rows, 4 warps)")
    ap.add_argument("--stages", default="1", help="int4vf sweep: software-pipelining depths to try, e.g. 1,2,3")
    ap.add_argument("--prefill", type=int, default=0,
                    help="also time prefill linears of this many rows (bf16 vs dequantize + GEMM)")
    ap.add_argument("--prefill-kinds", default="int4,int4g128z,int8")
    ap.add_argument("--no-gemv", action="store_true", help="skip the decode GEMV timings")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--json-name", default="kernel_bench.json")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    torch.manual_seed(0)
    checks: list = []
    if not args.no_checks:
        check_attention(checks)
    try:
        probe_int4_unpack(checks)
    except Exception as exc:  # report, keep going with the other checks
        checks.append({"check": "int4_unpack_probe", "ok": False, "error": repr(exc)[:2000]})
    if not args.no_checks:
        check_gemv(checks)
        check_dequantize(checks)
    for c in checks:
        print(json.dumps(c))
    print("correctness:", "ALL OK" if all(c["ok"] for c in checks) else "FAILURES")
    rows: list = []
    for shape in args.shapes.split(","):
        if not args.no_attention:
            time_attention(rows, shape)
            time_attention(rows, shape, span=2304, pos=2200)
            time_attention(rows, shape, batch=32, span=512, pos=383)
        if not args.no_gemv:
            time_gemv(rows, shape, args.kinds.split(","), M=args.batch, sweep=args.sweep,
                      sweep_kinds=[k for k in args.sweep_kinds.split(",") if k],
                      matrices=[m for m in args.matrices.split(",") if m], split_only=args.split_only,
                      stages=tuple(int(v) for v in args.stages.split(",")))
        if args.prefill:
            time_prefill(rows, shape, args.prefill_kinds.split(","), args.prefill)
    with open(os.path.join(args.out, args.json_name), "w") as f:
        json.dump({"checks": checks, "rows": rows, "device": torch.cuda.get_device_name()}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}")
    for r in rows:
        if r["bench"] == "decode_attention":
            print(f"attn {r['shape']} B={r['batch']} span={r['span']} pos={r['pos']}: sdpa {r['sdpa_us']:.1f} us, "
                  f"triton {r['triton_us']:.1f} us ({r['speedup']:.2f}x)")
    kinds = args.kinds.split(",")
    print("| shape | matrix | N x K | cuBLAS bf16 us (GB/s) | " + " | ".join(f"{k} us (GB/s)" for k in kinds) + " |")
    for r in rows:
        if r["bench"] != "gemv":
            continue
        cells = [f"{r.get(k + '_us', float('nan')):.1f} ({r.get(k + '_GBps', float('nan')):.0f})"
                 + (f" best {r[k + '_best']['us']:.1f} {r[k + '_best']['tiles']}" if k + "_best" in r else "")
                 for k in kinds]
        print(f"| {r['shape']} | {r['matrix']} | {r['N']}x{r['K']} | {r['cublas_bf16_us']:.1f} "
              f"({r['cublas_bf16_GBps']:.0f}) | " + " | ".join(cells) + " |")
    pk = args.prefill_kinds.split(",")
    if args.prefill:
        print(f"\nprefill linear, {args.prefill} rows, us: bf16 | " + " | ".join(
            f"{k} inductor dequant | {k} triton dequant" for k in pk))
    for r in rows:
        if r["bench"] == "prefill_linear":
            print(f"| {r['shape']} | {r['matrix']} | {r['N']}x{r['K']} | {r['bf16_us']:.1f} | " + " | ".join(
                f"{r[k + '_inductor_us']:.1f} | {r[k + '_triton_us']:.1f}" for k in pk) + " |")
    if args.stages != "1":  # int4vf / int4wf: the best config at each pipelining depth
        for r in rows:
            for kind in WORDS:
                sw = r.get(f"{kind}_sweep", [])
                best = {st: min((t, c) for c, t in sw if c[4] == st) for st in {c[4] for c, _ in sw}}
                if best:
                    print(f"{kind} {r['shape']} {r['matrix']}: " + ", ".join(
                        f"stages {st}: {t:.1f} us {c}" for st, (t, c) in sorted(best.items())))


if __name__ == "__main__":
    main()

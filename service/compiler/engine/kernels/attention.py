"""Triton decode attention (imported only where Triton and a GPU exist).

* ``decode_attention``: one query token per row against the static KV cache, flash-decoding style.
  The KV span is cut into splits so that even batch 1 fills the GPU; each program handles one
  (row, KV head, split) and every query head of that KV head's GQA group at once (one K/V read for
  the group). The new token's K/V is written into the cache by the program whose split holds its
  position (no separate scatter kernel, no copy of the cache), and only slots <= pos[b] are read, so
  the work follows the true context length, not the captured span bucket. A second kernel combines
  the splits' partial softmax sums.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attn_split(Q, KN, VN, KC, VC, POS, OP, ML,
                       sqb, sqh, skb, skh, svb, svh,
                       scb, sch, scs, svcb, svch, svcs,
                       sob, soh, sos, smb, smh, sms,
                       split_len, sm_scale,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                       IEEE: tl.constexpr, DP: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    pos = tl.load(POS + b)
    start = sp * split_len
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)  # DP: D rounded up to a power of two (head_size 96: 128, the tail masked)
    gmask = offs_g < G
    heads = kvh * G + offs_g
    kbase = KC + b * scb + kvh * sch
    vbase = VC + b * svcb + kvh * svch
    if DP == D:
        q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=gmask[:, None], other=0.0)
        kn = tl.load(KN + b * skb + kvh * skh + offs_d)
        vn = tl.load(VN + b * svb + kvh * svh + offs_d)
        if (pos >= start) & (pos < start + split_len):
            tl.store(kbase + pos * scs + offs_d, kn)
            tl.store(vbase + pos * svcs + offs_d, vn)
    else:
        dmask = offs_d < D
        q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=gmask[:, None] & dmask[None, :],
                    other=0.0)
        kn = tl.load(KN + b * skb + kvh * skh + offs_d, mask=dmask, other=0.0)
        vn = tl.load(VN + b * svb + kvh * svh + offs_d, mask=dmask, other=0.0)
        if (pos >= start) & (pos < start + split_len):
            tl.store(kbase + pos * scs + offs_d, kn, mask=dmask)
            tl.store(vbase + pos * svcs + offs_d, vn, mask=dmask)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    end = tl.minimum(start + split_len, pos + 1)
    for s0 in range(start, end, BS):
        offs_s = s0 + tl.arange(0, BS)
        smask = offs_s < end
        if DP == D:
            k = tl.load(kbase + offs_s[:, None] * scs + offs_d[None, :], mask=smask[:, None], other=0.0)
            v = tl.load(vbase + offs_s[:, None] * svcs + offs_d[None, :], mask=smask[:, None], other=0.0)
        else:
            kvmask = smask[:, None] & (offs_d < D)[None, :]
            k = tl.load(kbase + offs_s[:, None] * scs + offs_d[None, :], mask=kvmask, other=0.0)
            v = tl.load(vbase + offs_s[:, None] * svcs + offs_d[None, :], mask=kvmask, other=0.0)
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
    if DP == D:
        tl.store(OP + b * sob + heads[:, None] * soh + sp * sos + offs_d[None, :], acc, mask=gmask[:, None])
    else:
        tl.store(OP + b * sob + heads[:, None] * soh + sp * sos + offs_d[None, :], acc,
                 mask=gmask[:, None] & (offs_d < D)[None, :])
    tl.store(ML + b * smb + heads * smh + sp * sms, m_i, mask=gmask)
    tl.store(ML + b * smb + heads * smh + sp * sms + 1, l_i, mask=gmask)


@triton.jit
def _decode_attn_combine(OP, ML, OUT, sob, soh, sos, smb, smh, sms, s_outb,
                         NS: tl.constexpr, NSP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, NSP)
    offs_d = tl.arange(0, DP)
    mask = offs < NS
    m = tl.load(ML + b * smb + h * smh + offs * sms, mask=mask, other=float("-inf"))
    l_ = tl.load(ML + b * smb + h * smh + offs * sms + 1, mask=mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    total = tl.sum(l_ * w, 0)
    if DP == D:
        o = tl.load(OP + b * sob + h * soh + offs[:, None] * sos + offs_d[None, :], mask=mask[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / total
        tl.store(OUT + b * s_outb + h * D + offs_d, out.to(OUT.dtype.element_ty))
    else:
        dmask = offs_d < D
        o = tl.load(OP + b * sob + h * soh + offs[:, None] * sos + offs_d[None, :],
                    mask=mask[:, None] & dmask[None, :], other=0.0)
        out = tl.sum(o * w[:, None], 0) / total
        tl.store(OUT + b * s_outb + h * D + offs_d, out.to(OUT.dtype.element_ty), mask=dmask)


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
    bs = 32 if triton.next_power_of_2(d) >= 128 else 64
    _decode_attn_split[(B, nkv, ns)](
        q, k_new, v_new, k_cache, v_cache, pos, part, ml,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        part.stride(0), part.stride(1), part.stride(2), ml.stride(0), ml.stride(1), ml.stride(2),
        split_len, 1.0 / (d ** 0.5),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, BS=bs, IEEE=q.dtype == torch.float32,
        DP=triton.next_power_of_2(d), num_warps=4, num_stages=2,
    )
    _decode_attn_combine[(B, nh)](
        part, ml, out, part.stride(0), part.stride(1), part.stride(2), ml.stride(0), ml.stride(1), ml.stride(2),
        out.stride(0), NS=ns, NSP=max(2, triton.next_power_of_2(ns)), D=d, DP=triton.next_power_of_2(d), num_warps=4,
    )
    return out


def decode_attention_supported(head_size: int, dtype: torch.dtype) -> bool:
    # 96 (Phi-3 / Phi-3.5-mini) runs padded to 128 with the tail masked
    return head_size in (64, 96, 128, 256) and dtype in (torch.bfloat16, torch.float16, torch.float32)

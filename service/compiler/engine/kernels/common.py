"""Helpers shared by the engine's Triton GEMV kernels: the weight kinds, the row limit, the split-K K
range and gather, the split-K factor rule and its buffers (float32 partials, arrival counters)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

W_BF16, W_FP8, W_INT8, W_INT4 = 0, 1, 2, 3
GEMV_MAX_ROWS = 16


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


def _splits(n: int, k: int, step: int, rows: int = 16384) -> int:
    """Split-K factor for an [n, k] weight at batch <= 16: the most (<= 8) that keeps n x splits <= ``rows``
    (16384: up to ~512 programs of 32 rows: matrices with many rows already fill the GPU) and >= 512 K
    (and a whole number of ``step``s) per split. From the fourth session's sweep on the H100."""
    s = 8
    while s > 1 and (n * s > rows or k // s < max(512, step) or k % (step * s)):
        s //= 2
    return s


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

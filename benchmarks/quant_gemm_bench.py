"""GEMM-level speed of the quantizer's GPU FP8 path (``torch._scaled_mm``, activation quantization
included) against bf16 ``F.linear``, on Llama-3.1-8B linear shapes, at decode (M = 1, 8) and prefill
(M = 2048) sizes. CUDA events, median of 50 after 10 warm-ups. GPU only.

    python benchmarks/quant_gemm_bench.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.compiler.quantization.fp8 import quantize_per_tensor, scaled_mm_fp8  # noqa: E402

SHAPES = {"qkv 4096->6144": (4096, 6144), "gate+up 4096->28672": (4096, 28672), "down 14336->4096": (14336, 4096)}


def timed(fn, reps: int = 50) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times) * 1000  # microseconds


def main() -> int:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| linear | M | bf16 F.linear | FP8 scaled_mm (incl. act quant) | speed-up |")
    print("|---|---|---|---|---|")
    for name, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        w8, ws = quantize_per_tensor(w.float())
        w8, ws = w8.cuda(), ws.cuda()
        for m in (1, 8, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a = (x.float().abs().max() / 448).reshape(1)
            t_bf16 = timed(lambda x=x, w=w: F.linear(x, w))
            t_fp8 = timed(lambda x=x, a=a, w8=w8, ws=ws: scaled_mm_fp8(x, w8, ws, a, out_dtype=torch.bfloat16))
            print(f"| {name} | {m} | {t_bf16:.1f} us | {t_fp8:.1f} us | {t_bf16 / t_fp8:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

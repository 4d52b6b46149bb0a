"""Host-side cost of quantizing and building a quantized engine (the CPU work before any GPU timing).

Random bf16 weights with the Llama-3.1-8B width and a few decoder layers (``--layers``) are written as
an HF folder, quantized with Kiln's quantizer for each algo and built as a torch engine for the CPU (the
engine-weight writing is the same host work as for a GPU build; no compile). Prints seconds per
stage and per decoder layer, and that figure times 32 (an upper bound for the 8B shape: the per-layer
figure carries the embedding and lm_head's share).

    PYTHONPATH=. .venv/bin/python benchmarks/quant_build_bench.py --layers 2 --algos W4A16
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quant_engine_bench import synth_hf  # noqa: E402

from service.compiler.build import BuildConfig, build  # noqa: E402
from service.compiler.quantization import QuantConfig, quantize_checkpoint  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--algos", default="W4A16,W8A16")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    root = Path(a.work or tempfile.mkdtemp(prefix="kiln-qbb-"))
    shutil.rmtree(root / "hf", ignore_errors=True)
    synth = synth_hf(a.shape, root / "hf", layers=a.layers, device="cpu")
    print(f"{a.shape} width, {a.layers} layers, torch threads {torch.get_num_threads()}; synthesis {synth:.1f} s")
    print("| algo | quantize s | build s | per layer s (quantize + build) | x 32 layers s |")
    print("|---|---|---|---|---|")
    for algo in a.algos.split(","):
        ckpt, engine = root / f"q-{algo}", root / f"engine-{algo}"
        for p in (ckpt, engine):
            shutil.rmtree(p, ignore_errors=True)
        t0 = time.perf_counter()
        quantize_checkpoint(root / "hf", ckpt, QuantConfig(algo), dtype="bfloat16")  # weight-only: no calibration
        tq = time.perf_counter() - t0
        t0 = time.perf_counter()
        build(ckpt, BuildConfig(max_batch_size=1, max_input_len=128, max_seq_len=384, dtype="bfloat16",
                                target="cpu", measure_performance=False), engine)
        tb = time.perf_counter() - t0
        per = (tq + tb) / a.layers
        print(f"| {algo} | {tq:.1f} | {tb:.1f} | {per:.2f} | {32 * per:.0f} |", flush=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(engine, ignore_errors=True)
    if not a.work:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

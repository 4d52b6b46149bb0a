"""Calibration time and memory of the quantizer on Llama-shaped models (synthetic bf16 weights), GPU when present.

Writes (once) a synthetic Llama checkpoint of the chosen shape with ``convert_bench.ensure_checkpoint``,
then runs ``quantize_checkpoint`` per algo with random calibration token ids (the shapes have no
tokenizer; accuracy is not measured here, see quant_bench.py): pass 1 (layer-by-layer calibration and
searches, on the GPU) and pass 2 (quantize + write). Prints a markdown table.

    python benchmarks/quant_calib_bench.py --shape 1b --algos FP8,W4A16_AWQ,W8A8_SQ_PER_CHANNEL --samples 128 --seq-len 512
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import convert_bench  # noqa: E402

from service.compiler.checkpoint.validate import validate_checkpoint  # noqa: E402
from service.compiler.quantization import CalibrationSettings, QuantConfig, quantize_checkpoint  # noqa: E402

convert_bench.SHAPES.setdefault("8b", {"name": "Llama-3.1-8B", "hidden_size": 4096, "num_hidden_layers": 32,
                                       "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                                       "intermediate_size": 14336})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b", choices=sorted(convert_bench.SHAPES))
    ap.add_argument("--algos", default="FP8,W4A16_AWQ,W8A8_SQ_PER_CHANNEL")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--data-dir", default="bench-data")
    ap.add_argument("--out-dir", default=None, help="where checkpoints are written (default: a temp dir)")
    args = ap.parse_args(argv)
    src = convert_bench.ensure_checkpoint(Path(args.data_dir), args.shape)
    vocab = 128256
    ids = torch.randint(0, vocab, (args.samples + 4, args.seq_len), generator=torch.Generator().manual_seed(0))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for algo in args.algos.split(","):
        with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
            marks: dict[str, float] = {}
            t0 = time.perf_counter()

            def progress(frac: float, msg: str, marks=marks, t0=t0) -> None:
                if frac <= 0.85:
                    marks["pass1"] = time.perf_counter() - t0

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            calib = CalibrationSettings(samples=args.samples, seq_len=args.seq_len, heldout_samples=4,
                                        token_ids=ids, device=device)
            s = quantize_checkpoint(src, Path(tmp) / "q", QuantConfig(algo), calibration=calib, dtype="bfloat16",
                                    progress=progress)
            total = time.perf_counter() - t0
            ok = validate_checkpoint(Path(tmp) / "q", strict=True).ok
            gpu = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            rows.append(f"| {convert_bench.SHAPES[args.shape]['name']} | {algo} | {args.samples} x {args.seq_len} | "
                        f"{marks.get('pass1', 0):.0f} s | {total:.0f} s | {gpu:.1f} GiB | {rss:.1f} GiB | "
                        f"{'ok' if ok else 'INVALID'} | {s.record.get('smoothquant_alpha', '')} |")
            print(rows[-1], flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}\n")
    print("| shape | algo | calibration | pass 1 (calibrate) | total | peak GPU mem | peak host RSS | validate | alpha |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

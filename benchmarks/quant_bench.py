"""Accuracy of every quantization algo on the real SmolLM2-135M-Instruct, measured on the artifacts.

Each algo quantizes the model (calibration from the bundled English text), the checkpoint is
validated, then executed from its stored low-precision tensors on held-out windows from the other end
of the text and compared with the float32 model: perplexity, Δ perplexity, % recovery
(ppl_ref / ppl_q), top-1 agreement, mean KL(P_ref || P_q), ROUGE-L of greedy continuations. Prints a
markdown table (and JSON with --json). CPU only; GPU speed columns are not measured here.

    PYTHONPATH=. .venv/bin/python benchmarks/quant_bench.py                      # every algo, ~5-10 min on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/quant_bench.py --algos "FP8 GPTQ weights (Kiln default)" --samples 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.compiler.checkpoint.validate import validate_checkpoint  # noqa: E402
from service.compiler.quantization import CalibrationSettings, QuantConfig, quantize_checkpoint  # noqa: E402
from service.compiler.quantization.calibration import evaluation_windows, load_tokenizer  # noqa: E402
from service.compiler.quantization.report import MARKDOWN_HEADER, CheckpointRunner, compare  # noqa: E402
from service.compiler.sources.smollm2 import smollm2_hf_dir  # noqa: E402

# SmolLM2's hidden size 576 is not a multiple of 128: the group-wise algos run at group 64.
ALGOS = {
    "W8A16": lambda: QuantConfig("W8A16"),
    "W8A16+INT8KV amax/127 (TRT-LLM)": lambda: QuantConfig("W8A16", kv_cache_quant_algo="INT8", kv_clip_search=False),
    "W8A16+INT8KV searched clip": lambda: QuantConfig("W8A16", kv_cache_quant_algo="INT8"),
    "FP8 max calibration (ModelOpt)": lambda: QuantConfig("FP8", fp8_gptq=False),
    "FP8 GPTQ weights (Kiln default)": lambda: QuantConfig("FP8"),
    "FP8+FP8KV": lambda: QuantConfig("FP8", kv_cache_quant_algo="FP8"),
    "FP8_PER_CHANNEL_PER_TOKEN": lambda: QuantConfig("FP8_PER_CHANNEL_PER_TOKEN"),
    "W8A8_SQ alpha=1.0 (ModelOpt)": lambda: QuantConfig("W8A8_SQ_PER_CHANNEL", smoothquant_alpha=1.0),
    "W8A8_SQ searched alpha": lambda: QuantConfig("W8A8_SQ_PER_CHANNEL"),
    "W8A8_SQ per-token plugin searched alpha": lambda: QuantConfig("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"),
    "W4A16 per-channel RTN": lambda: QuantConfig("W4A16"),
    "W4A16 g64 RTN": lambda: QuantConfig("W4A16_AWQ", group_size=64, awq_grid=1, awq_clip=False),
    "W4A16_AWQ g64 lite (11-pt no clip)": lambda: QuantConfig("W4A16_AWQ", group_size=64, awq_grid=11, awq_clip=False),
    "W4A16_AWQ g64 (20-pt + clip)": lambda: QuantConfig("W4A16_AWQ", group_size=64),
    "W4A16_AWQ g64 zero point": lambda: QuantConfig("W4A16_AWQ", group_size=64, has_zero_point=True),
}
PROMPTS = ["The three primary colors are", "In Python, a list comprehension"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default=",".join(ALGOS), help="comma-separated keys of ALGOS")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf = smollm2_hf_dir()
    ref = CheckpointRunner.from_hf(hf)
    windows = evaluation_windows(hf, args.eval_samples, args.eval_seq_len)
    ref_logits = ref.logits(windows)
    tok = load_tokenizer(hf)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ref_gen = [ref.generate(p, args.new_tokens) for p in prompts]
    calib = CalibrationSettings(samples=args.samples, seq_len=args.seq_len, heldout_samples=4, awq_tokens=512)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [a.strip() for a in args.algos.split(",") if a.strip()]:
            out = Path(tmp) / f"q{len(results)}"
            t0 = time.perf_counter()
            summary = quantize_checkpoint(hf, out, ALGOS[name](), calibration=calib, dtype="float32")
            seconds = time.perf_counter() - t0
            assert validate_checkpoint(out, strict=True).ok
            rep = compare(CheckpointRunner.from_dir(out), ref, windows, prompts, args.new_tokens,
                          ref_logits=ref_logits, ref_generations=ref_gen)
            extra = summary.record.get("smoothquant_alpha")
            row = rep.markdown_row(name + (f" (α={extra})" if extra is not None and "searched" in name else ""))
            rows.append(row + f" {seconds:.0f} s |")
            results.append({"algo": name, "quantize_seconds": seconds, **rep.to_dict()})
            print(rows[-1], flush=True)
            import shutil

            shutil.rmtree(out)
    ppl_ref = results[0]["perplexity_reference"] if results else float("nan")
    print(f"\nSmolLM2-135M-Instruct, float32 reference perplexity {ppl_ref:.3f} on {args.eval_samples} x "
          f"{args.eval_seq_len} held-out tokens; calibration {args.samples} x {args.seq_len} tokens (bundled text)\n")
    print(MARKDOWN_HEADER.replace("| verdict |", "| verdict | quantize time |").replace("|---|---|---|---|---|---|---|---|",
                                                                                      "|---|---|---|---|---|---|---|---|---|"))
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

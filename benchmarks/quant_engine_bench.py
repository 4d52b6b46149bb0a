"""Decode speed of quantized torch engines against the bf16 engine, side by side in one run (GPU).

For each shape: random bf16 weights with the real Llama shape are written as an HF folder (made on
the GPU), converted to a bf16 checkpoint, quantized with Kiln's quantizer for each algo (calibrated on
random token ids: the weights are random, so only speed is measured here; accuracy is in
quant_bench.py on the real SmolLM2), built as torch engines with the same BuildConfig (batch 1,
128-token prompt + 256 new tokens), and each engine is measured in a fresh process by
engine_bench.py's worker: batch-1 decode tokens/s (median of 3 generations), TTFT at 128 tokens.

    PYTHONPATH=. python3 benchmarks/quant_engine_bench.py --shapes 8b,1b --algos FP8,W4A16,W4A16_AWQ --out $OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import engine_bench  # noqa: E402

from service.compiler.build import BuildConfig, build  # noqa: E402
from service.compiler.checkpoint.safetensors_io import SafetensorsWriter, dtype_name  # noqa: E402
from service.compiler.convert import convert_checkpoint  # noqa: E402
from service.compiler.quantization import CalibrationSettings, QuantConfig, quantize_checkpoint  # noqa: E402


def synth_hf(shape: str, out: Path, std: float = 0.02, *, layers: int | None = None, device: str = "cuda") -> float:
    """Random bf16 HF folder with the real shape (``layers``: fewer decoder layers), made on ``device``."""
    s = dict(engine_bench.SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    H, inter, L, nh, nkv, d, V = (s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                                  s["num_attention_heads"], s["num_key_value_heads"], s["head_size"], s["vocab_size"])
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": inter,
           "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": d,
           "vocab_size": V, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": s["rope_factor"], "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
           "tie_word_embeddings": s["tie"], "torch_dtype": "bfloat16", "hidden_act": "silu"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    names = [("model.embed_tokens.weight", (V, H)), ("model.norm.weight", (H,))]
    if not s["tie"]:
        names.append(("lm_head.weight", (V, H)))
    for i in range(L):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                  (p + "self_attn.q_proj.weight", (nh * d, H)), (p + "self_attn.k_proj.weight", (nkv * d, H)),
                  (p + "self_attn.v_proj.weight", (nkv * d, H)), (p + "self_attn.o_proj.weight", (H, nh * d)),
                  (p + "mlp.gate_proj.weight", (inter, H)), (p + "mlp.up_proj.weight", (inter, H)),
                  (p + "mlp.down_proj.weight", (H, inter))]
    g = torch.Generator(device=device).manual_seed(0)
    with SafetensorsWriter(out / "model.safetensors", [(n, dtype_name(torch.bfloat16), sh) for n, sh in names],
                           metadata={"format": "pt"}) as w:
        for n, sh in names:
            t = torch.ones(sh) if len(sh) == 1 else torch.randn(sh, generator=g, device=device) * std
            w.write(n, 0, t.to(torch.bfloat16).cpu())
    return time.perf_counter() - t0


def add_word_tokenizer(out: Path, vocab_size: int) -> int:
    """A word-level tokenizer over the quantizer's bundled calibration text, saved into the HF folder
    ``out`` (``tokenizer.json`` + config), so ``kiln convert --quantization`` calibrates a random-weight
    model through the public CLI with real text windows. Ids: the text's words by frequency, below
    ``vocab_size``; returns the number of ids used."""
    import collections
    import re

    import tokenizers
    import transformers

    from service.compiler.quantization.calibration import bundled_text

    words = collections.Counter(re.findall(r"\w+|[^\w\s]+", bundled_text()))
    vocab = {"<unk>": 0, **{w: i + 1 for i, (w, _) in enumerate(words.most_common(vocab_size - 1))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(out)
    return len(vocab)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8b,1b")
    ap.add_argument("--algos", default="FP8,W4A16,W4A16_AWQ")
    ap.add_argument("--work", default="/tmp/kiln-quant-engine-bench")
    ap.add_argument("--out", default=".")
    ap.add_argument("--int4-kernels", default="cuda_cores,tensor_cores",
                    help="W4A16 engines: time each batch-1 int4 kernel (KILN_INT4_BATCH1_KERNEL), the first "
                         "as the row's figure")
    ap.add_argument("--keep-engines", action="store_true",
                    help="leave each shape's engines in --work (for benchmarks/prefill_profile.py)")
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    bc = BuildConfig(max_batch_size=1, max_input_len=engine_bench.PROMPT,
                     max_seq_len=engine_bench.PROMPT + engine_bench.NEW, dtype="bfloat16", target="auto",
                     measure_performance=False)  # each engine is timed by engine_bench's worker below
    for shape in a.shapes.split(","):
        r: dict = {}
        results["shapes"][shape] = r
        root = work / shape
        shutil.rmtree(root, ignore_errors=True)
        r["synth_s"] = synth_hf(shape, root / "hf")
        t0 = time.perf_counter()
        convert_checkpoint(root / "hf", root / "bf16", dtype="bfloat16")
        r["convert_s"] = time.perf_counter() - t0
        V = engine_bench.SHAPES[shape]["vocab_size"]
        ids = torch.randint(0, V, (36, 256), generator=torch.Generator().manual_seed(0))
        for algo in ["bf16"] + a.algos.split(","):
            row: dict = {}
            r[algo] = row
            ckpt = root / "bf16"
            if algo != "bf16":
                ckpt = root / f"q-{algo}"
                t0 = time.perf_counter()
                calib = CalibrationSettings(samples=32, seq_len=256, heldout_samples=4, awq_tokens=512, token_ids=ids)
                quantize_checkpoint(root / "hf", ckpt, QuantConfig(algo), calibration=calib, dtype="bfloat16")
                row["quantize_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            row["build"] = build(ckpt, bc, root / f"engine-{algo}")
            row["build_s"] = time.perf_counter() - t0
            row["engine_bytes"] = sum(f.stat().st_size for f in (root / f"engine-{algo}").glob("rank*.safetensors"))
            worker = ["--worker", "engine", "--engine", str(root / f"engine-{algo}"), "--shape", shape, "--flags", ""]
            kernels = a.int4_kernels.split(",") if algo == "W4A16" else [None]
            for kern in kernels:  # the same engine, fresh processes; its compile cache serves both
                env = {"KILN_INT4_BATCH1_KERNEL": kern} if kern else None
                row["run" if kern == kernels[0] else f"run_{kern}"] = engine_bench.spawn(worker, env)
                row.setdefault("int4_kernel", kern)
            print(shape, algo, json.dumps({k: v for k, v in row.items() if k != "build"})[:1500], flush=True)
            if not a.keep_engines:
                shutil.rmtree(root / f"engine-{algo}", ignore_errors=True)
            if algo != "bf16":
                shutil.rmtree(ckpt, ignore_errors=True)
            (out / "quant_engine_bench.json").write_text(json.dumps(results, indent=2))
        if not a.keep_engines:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{results['device']}, torch {results['torch']}; batch 1, {engine_bench.PROMPT}-token prompt, "
          f"{engine_bench.NEW} new tokens, random weights")
    print("| shape | algo | engine weights GB | decode tok/s bs1 | x bf16 | TTFT@128 ms | quantize s | build s |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, r in results["shapes"].items():
        base = r.get("bf16", {}).get("run", {}).get("bs1_decode_tok_s")
        for algo, row in r.items():
            if not isinstance(row, dict) or "run" not in row:
                continue
            runs = [(row.get("int4_kernel"), row["run"])] + [(k[4:], v) for k, v in row.items() if k.startswith("run_")]
            for kern, run in runs:
                if "error" in run:
                    print(f"| {shape} | {algo} ({kern}) | ERROR {run['error'][-400:]!r} |")
                    continue
                tok = run["bs1_decode_tok_s"]
                print(f"| {engine_bench.SHAPES[shape]['name']} | {algo}{f' ({kern})' if kern else ''} | "
                      f"{row['engine_bytes'] / 1e9:.2f} | {tok:.1f} | {tok / base:.2f} | {1e3 * run['ttft128_s']:.1f} | "
                      f"{row.get('quantize_s', 0):.0f} | {row['build_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

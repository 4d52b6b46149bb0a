"""Batch-1 decode of the new dense families (issue 17) beside Llama, against the HBM roofline.

For each shape (Llama-3.1-8B, Qwen3-8B, Gemma-2-9B by default) the family's own converter config
(``trt_config`` of an HF ``config.json``-like dict) and engine weight map give the torch engine's
tensors, which are made RANDOM directly on the device (bf16; nothing is written to disk, so the
64 GB disk of the GPU box is not touched). The engine model (``EngineModel``: compiled steps, CUDA
graphs, the same decode loop ``Engine.generate`` runs) then decodes a 128-token prompt plus 256 new
tokens at batch 1. Printed per shape: decode tok/s, the weight bytes read per token (every engine
tensor but the embedding, which is a gather), the roofline tok/s = copy bandwidth / those bytes
(device-to-device copy measured in the same run), and the fraction of it reached; the last lines give
each family's fraction divided by Llama's (issue 17 asks for >= 0.85).

    PYTHONPATH=. python3 benchmarks/family_bench.py --out $OUT                 # H200: the 8B-class shapes
    PYTHONPATH=. python3 benchmarks/family_bench.py --shapes llama8b,gemma2-9b --out $OUT
    PYTHONPATH=. python3 benchmarks/family_bench.py --shapes llama3b,phi3.5-mini --out $OUT   # Phi at its size
    PYTHONPATH=. python3 benchmarks/family_bench.py --tiny                      # CPU smoke test (seconds)

Progress goes line by line to stdout and to ``$OUT/family_bench.log`` (results also as
``$OUT/family_bench.json``) when ``--out`` or $OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# HF config.json fields of the real models (weights random)
SHAPES = {
    "llama8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}},
    "qwen3-8b": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
                 "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
                 "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 1000000.0},
    "gemma2-9b": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
                  "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
                  "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192,
                  "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 10000.0,
                  "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                  "query_pre_attn_scalar": 256},
    # Phi-3.5-mini-instruct (longrope factors are placeholders: speed does not depend on them)
    "phi3.5-mini": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
                    "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 131072,
                    "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                    "hidden_act": "silu", "sliding_window": 262144, "tie_word_embeddings": False,
                    "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 48 for i in range(48)],
                                     "long_factor": [1.0 + 20 * i / 48 for i in range(48)]}},
    # Llama-3.2-3B: the Llama engine at Phi-3.5-mini's size (hidden 3072), for a like-for-like fraction
    "llama3b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 3072,
                "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
                "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512}
PROMPT, NEW = 128, 256
LOG: list[Path] = []


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    for path in LOG:
        with path.open("a") as f:
            f.write(line + "\n")


def hf_config(shape: str, tiny: bool) -> dict:
    hf = dict(SHAPES[shape])
    if tiny:
        hf.update(TINY)
        if "head_dim" in hf:
            hf["head_dim"] = 16
        if "sliding_window" in hf:
            hf["sliding_window"], hf["query_pre_attn_scalar"] = 8, 16
        if (hf.get("rope_scaling") or {}).get("type") == "longrope":
            half = hf["hidden_size"] // hf["num_attention_heads"] // 2
            hf["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * half, "long_factor": [2.0] * half}
            hf["original_max_position_embeddings"] = 64
    return hf


def random_engine_weights(cfg: dict, device: torch.device, dtype: torch.dtype) -> tuple[dict, int, int]:
    """Engine tensors of a checkpoint config (tp 1), random: norms 1, the rest N(0, 0.02). Returns
    (weights, bytes read per decode step (all but the embedding), total bytes)."""
    from service.compiler.models import spec_for_checkpoint

    family = spec_for_checkpoint(cfg)
    shapes = {n: s for n, s, _ in family.expected(cfg, 0)}
    g = torch.Generator(device=device).manual_seed(0)
    weights, read, total = {}, 0, 0
    for name, sources in family.engine_weight_map(cfg):
        rows = sum(shapes[s][0] for s in sources)
        shape = (rows, *shapes[sources[0]][1:])
        if len(shape) == 1:
            t = torch.ones(shape, dtype=dtype, device=device)
        else:
            t = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(0.02)
        weights[name] = t
        nbytes = t.numel() * t.element_size()
        total += nbytes
        read += 0 if name == "embed" else nbytes
    return weights, read, total


def copy_bandwidth(device: torch.device) -> float:
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_shape(shape: str, args, device: torch.device, bw: float) -> dict:
    from service.compiler.checkpoint.mapping import Mapping
    from service.compiler.engine.engine import Engine
    from service.compiler.engine.model import EngineModel
    from service.compiler.models import spec_for_hf

    hf = hf_config(shape, args.tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = spec_for_hf(hf).trt_config(hf, "bfloat16" if dtype == torch.bfloat16 else "float32", Mapping())
    prompt, new = (16, 24) if args.tiny else (PROMPT, NEW)
    max_seq = 64 if args.tiny else 512
    t0 = time.perf_counter()
    weights, read, total = random_engine_weights(cfg, device, dtype)
    sync(device)
    log(f"{shape}: {cfg['architecture']} random weights {total / 1e9:.2f} GB on {device} in "
        f"{time.perf_counter() - t0:.1f} s; read per token {read / 1e9:.3f} GB")
    model = EngineModel(cfg, weights, max_batch=1, max_seq=max_seq)
    spans = sorted({model.k_cache[lp.cache].shape[2] for lp in model.plans if lp.cache >= 0})
    log(f"{shape}: KV cache spans per layer kind {spans} (sliding layers: a ring of min(window, max_seq))")
    if device.type == "cuda" and not args.no_compile:
        model.compile()
    bc = {"max_batch_size": 1, "max_seq_len": max_seq, "max_input_len": prompt, "max_num_tokens": max_seq}
    engine = Engine(Path(args.work), {"build_config": bc, "pretrained_config": cfg, "engine": {}}, model,
                    use_graphs=device.type == "cuda")
    ids = torch.randint(0, int(cfg["vocab_size"]), (1, prompt), generator=torch.Generator().manual_seed(1)).tolist()
    t0 = time.perf_counter()
    engine.generate(ids, max_new_tokens=new)  # compiles the prefill and the one decode bucket used, captures it
    log(f"{shape}: first generate (compile + capture) {time.perf_counter() - t0:.1f} s")
    runs = []
    for _ in range(args.repeats):
        st = engine.generate(ids, max_new_tokens=new).stats
        runs.append((new - 1) / st["decode_seconds"])
    tok_s = max(runs)
    roof = bw / read
    res = {"shape": shape, "architecture": cfg["architecture"], "layers": cfg["num_hidden_layers"],
           "decode_tok_s": round(tok_s, 2), "runs_tok_s": [round(r, 2) for r in runs],
           "weight_bytes_per_token": read, "roofline_tok_s": round(roof, 2), "fraction": round(tok_s / roof, 4),
           "kv_spans": spans, "prompt": prompt, "new_tokens": new, "dtype": str(dtype).replace("torch.", "")}
    log(f"{shape}: decode {tok_s:.1f} tok/s (runs {res['runs_tok_s']}), roofline {roof:.1f} tok/s "
        f"({read / 1e9:.3f} GB/token at {bw / 1e12:.3f} TB/s): {100 * tok_s / roof:.1f}% of roofline")
    engine.close()
    del engine, model, weights
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama8b,qwen3-8b,gemma2-9b", help=f"from {', '.join(SHAPES)}")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (tests the script)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="eager steps (CUDA graphs still captured)")
    ap.add_argument("--work", default="/tmp/kiln_family_bench", help="the (empty) engine_dir the Engine names")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        LOG.append(Path(args.out) / "family_bench.log")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(f"device {name}, torch {torch.__version__}, shapes {shapes}, tiny={args.tiny}")
    bw = copy_bandwidth(device)
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s")
    results = []
    with torch.inference_mode():
        for s in shapes:
            results.append(bench_shape(s, args, device, bw))
    # each family against the Llama engine of the nearest size in the same run (bytes read per token):
    # fixed per-token costs (launches, norms, attention) weigh more in a smaller model's fraction
    llamas = [r for r in results if r["architecture"] == "LlamaForCausalLM"]
    log("shape        arch                    tok/s   roofline  fraction  vs Llama (shape)")
    for r in results:
        base = min(llamas, key=lambda b: abs(b["roofline_tok_s"] - r["roofline_tok_s"])) if llamas else None
        r["fraction_vs_llama"] = round(r["fraction"] / base["fraction"], 3) if base else None
        r["llama_shape"] = base["shape"] if base else None
        vs = f"{r['fraction_vs_llama']:.3f} ({base['shape']})" if base else "-"
        log(f"{r['shape']:<12} {r['architecture']:<22} {r['decode_tok_s']:>7.1f} {r['roofline_tok_s']:>9.1f} "
            f"{r['fraction']:>9.3f}  {vs}")
    if args.out:
        (Path(args.out) / "family_bench.json").write_text(json.dumps(
            {"device": name, "copy_bandwidth_bytes_s": bw, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

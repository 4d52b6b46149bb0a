"""Batch-1 decode of the Phi-3.5-mini shape beside the Llama-3.1-8B shape, against the HBM roofline.

Random bf16 weights with the real shapes are written as TensorRT-LLM checkpoints on the machine itself
(nothing travels), built into torch engines on one GPU, and timed in this process one after the other:
a 128-token prompt, 256 new tokens, median of 3. The roofline is the measured device copy bandwidth
divided by the bytes one decode step reads (every weight but the embedding gather, plus the KV cache at
the mean context); each shape's fraction of it is printed, and Phi-3's fraction over Llama's (issue 17
asks for at least 0.85).

    PYTHONPATH=. python3 benchmarks/family_bench_phi3.py --work /dev/shm/fb --out $OUT     # H200, ~6 min
    PYTHONPATH=. python3 benchmarks/family_bench_phi3.py --tiny                            # CPU smoke run

``bench_shape(cfg, work, ...)`` is the function to call from another benchmark (one row of the table).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT, NEW = 128, 256


def phi3_config(hidden: int = 3072, layers: int = 32, heads: int = 32, kv_heads: int = 32, head_size: int = 96,
                inter: int = 8192, vocab: int = 32064) -> dict:
    """Phi-3.5-mini-instruct's checkpoint config (longrope, 4,096 original positions of 131,072), as the
    converter writes it; the longrope factors are placeholders (speed does not depend on them)."""
    from service.compiler.checkpoint.mapping import Mapping
    from service.compiler.models.phi3 import PHI3

    half = head_size // 2
    hf = {"architectures": ["Phi3ForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
          "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
          "vocab_size": vocab, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "sliding_window": 262144,
          "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / half for i in range(half)],
                           "long_factor": [1.0 + 20 * i / half for i in range(half)]}}
    return PHI3.trt_config(hf, "bfloat16", Mapping())


def llama_config(tiny: bool) -> dict:
    from benchmarks.engine_bench import SHAPES, trt_config

    s = dict(SHAPES["8b"])
    if tiny:
        s.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_size=16, vocab_size=512)
    return trt_config(s)


def synth_checkpoint(cfg: dict, out: Path, std: float = 0.02, seed: int = 0) -> None:
    """Random weights (norms 1) for every tensor the family's spec expects, made on the GPU when there is one."""
    from service.compiler.checkpoint.safetensors_io import SafetensorsWriter, dtype_name
    from service.compiler.models import spec_for_checkpoint

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    names = spec_for_checkpoint(cfg).expected(cfg, 0)
    g = torch.Generator(device=dev).manual_seed(seed)
    with SafetensorsWriter(out / "rank0.safetensors", [(n, dtype_name(d), s) for n, s, d in names]) as w:
        for name, shape, dt in names:
            t = (torch.ones(shape, dtype=dt) if len(shape) == 1 else
                 (torch.randn(shape, generator=g, device=dev) * std).to(dt).cpu())
            w.write(name, 0, t)


def decode_bytes(cfg: dict, ctx: float) -> int:
    """Bytes one batch-1 decode step reads: every weight but the embedding (a gather), + K/V of ``ctx`` tokens."""
    from service.compiler.models import block_specs, spec_for_checkpoint

    item = 2 if cfg["dtype"] in ("bfloat16", "float16") else 4
    weights = sum(item * torch.Size(s).numel() for n, s, _ in spec_for_checkpoint(cfg).expected(cfg, 0, dtype="x")
                  if n != "transformer.vocab_embedding.weight")
    kv = sum(2 * b.attention.num_kv_heads * b.attention.head_size * item for b in block_specs(cfg).blocks)
    return int(weights + kv * ctx)


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write), as benchmarks/engine_bench.py measures it."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.empty((1 << 30) if dev == "cuda" else (1 << 26), dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    if dev == "cuda":
        torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t0)


def bench_shape(name: str, cfg: dict, work: Path, bandwidth: float, prompt: int = PROMPT, new: int = NEW) -> dict:
    """Build ``cfg``'s random checkpoint into an engine on this machine's GPU (CPU without one) and time
    batch-1 decode; returns one table row (tok/s, roofline tok/s, fraction)."""
    from service.compiler.build import BuildConfig, build
    from service.compiler.engine.engine import Engine

    ckpt, engine_dir = work / f"{name}-ckpt", work / f"{name}-engine"
    t0 = time.perf_counter()
    synth_checkpoint(cfg, ckpt)
    gpu = torch.cuda.is_available()
    build(ckpt, BuildConfig(max_batch_size=1, max_input_len=prompt, max_seq_len=prompt + new + 64,
                            target="auto" if gpu else "cpu", measure_performance=False), engine_dir)
    build_s = time.perf_counter() - t0
    engine = Engine.load(engine_dir)
    ids = torch.randint(0, cfg["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(1)).tolist()
    for _ in range(2):
        engine.generate(ids, new)
    runs = [engine.generate(ids, new).stats for _ in range(3)]
    tok_s = statistics.median((new - 1) / r["decode_seconds"] for r in runs)
    per_token = decode_bytes(cfg, prompt + new / 2)
    roof = bandwidth / per_token
    row = {"shape": name, "architecture": cfg["architecture"], "decode_tok_s": round(tok_s, 1),
           "bytes_per_token_gb": round(per_token / 1e9, 3), "roofline_tok_s": round(roof, 1),
           "fraction_of_roofline": tok_s / roof, "build_and_synth_s": round(build_s, 1),
           "device": str(engine.device)}
    del engine
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke run of the script)")
    ap.add_argument("--work", default="/tmp/kiln-family-bench-phi3")
    ap.add_argument("--out", default=None, help="directory for results.json")
    a = ap.parse_args()
    work = Path(a.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    phi = phi3_config(64, 2, 4, 2, 16, 128, 512) if a.tiny else phi3_config()
    prompt, new = (16, 24) if a.tiny else (PROMPT, NEW)
    bw = copy_bandwidth()
    rows = [bench_shape("Phi-3.5-mini" + (" (tiny)" if a.tiny else ""), phi, work, bw, prompt, new),
            bench_shape("Llama-3.1-8B" + (" (tiny)" if a.tiny else ""), llama_config(a.tiny), work, bw, prompt, new)]
    ratio = rows[0]["fraction_of_roofline"] / rows[1]["fraction_of_roofline"]
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; batch 1, {prompt}-token prompt, {new} new tokens, bf16")
    print("| shape | decode tok/s | GB read / token | roofline tok/s | fraction of roofline |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['decode_tok_s']} | {r['bytes_per_token_gb']} | {r['roofline_tok_s']} | "
              f"{r['fraction_of_roofline']:.2%} |")
    print(f"Phi-3 fraction / Llama fraction = {ratio:.2f} (issue 17: >= 0.85)")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "family_bench_phi3.json").write_text(json.dumps(
            {"copy_bandwidth_gb_s": bw / 1e9, "rows": rows, "phi3_over_llama_fraction": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

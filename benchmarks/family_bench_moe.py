"""Mixture-of-Experts decode benchmark: the Mixtral-8x7B shape on one GPU, batch 1, against the HBM roofline.

Builds the torch engine's model (``engine/model.py``, the ``kiln-moe-fused/1`` layout) from RANDOM bf16
weights made directly in GPU memory (~94 GB: it fits an H200's 141 GB but not its 64 GB disk, so no
checkpoint is written): the engine weight map of the checkpoint config gives every tensor's name and
shape, and the tensors go through the same ``EngineModel`` constructor ``Engine.load`` feeds from the
engine file. Then it compiles, captures CUDA graphs, and decodes 256 tokens after a 128-token prompt.

The roofline counts the bytes one decode step must read: per layer the attention (qkv, o), the norms,
the router and the top_k ACTIVE experts only (3 x I x H each), plus one embedding row, the final norm,
lm_head and (second figure) the KV cache at the mean context; divided by the measured device-to-device
copy bandwidth (and the HBM spec).

    PYTHONPATH=. python3 benchmarks/family_bench_moe.py                 # H200: Mixtral-8x7B shape, bf16
    PYTHONPATH=. python3 benchmarks/family_bench_moe.py --tiny          # CPU: a tiny shape, float32, eager
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from family_bench import copy_bandwidth  # noqa: E402

MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "rms_norm_eps": 1e-5,
                "rope_theta": 1e6, "max_position_embeddings": 32768, "hidden_act": "silu",
                "tie_word_embeddings": False}
TINY = {**MIXTRAL_8X7B, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}


def checkpoint_config(hf: dict, dtype: str) -> dict:
    from service.compiler.checkpoint.mapping import Mapping
    from service.compiler.models.moe import MOE

    cfg = MOE.trt_config(hf, dtype, Mapping())
    MOE.check_mapping(cfg, Mapping())
    return cfg


def random_engine_weights(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Every engine tensor (the family's weight map over the checkpoint shapes), random, on ``device``:
    norms 1, matrices N(0, 1/fan_in) (embedding N(0, 1)), so activations keep their scale."""
    from service.compiler.models.moe import MOE, engine_weight_map

    shapes = {n: s for n, s, _ in MOE.expected(cfg, 0)}
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, sources in engine_weight_map(cfg):
        first = shapes[sources[0]]
        shape = (sum(shapes[s][0] for s in sources), *first[1:])
        if len(shape) == 1:
            out[name] = torch.ones(shape, dtype=dtype, device=device)
            continue
        t = torch.empty(shape, dtype=dtype, device=device)
        t.normal_(0.0, 1.0 if name == "embed" else shape[-1] ** -0.5, generator=g)
        out[name] = t
    return out


def bytes_per_token(cfg: dict, elt: int) -> tuple[int, int]:
    """(weights read per decode step with only the active experts, KV-cache bytes per context token)."""
    from service.compiler.models.moe import moe_settings

    H, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    nh, nkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
    experts, top_k, inter, shared, _ = moe_settings(cfg)
    per_layer = (nh + 2 * nkv) * d * H + nh * d * H + 2 * H + experts * H + top_k * 3 * inter * H
    per_layer += 3 * shared * H + H if shared else 0
    weights = L * per_layer + H + H + V * H  # + one embedding row, the final norm, lm_head
    return weights * elt, L * 2 * nkv * d * elt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (float32, eager): a smoke run")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    from service.compiler.engine.engine import Engine
    from service.compiler.engine.model import EngineModel

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype_name = "float32" if device.type == "cpu" else "bfloat16"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    hf = TINY if args.tiny else MIXTRAL_8X7B
    cfg = checkpoint_config(hf, dtype_name)
    max_seq = args.prompt + args.new
    t0 = time.perf_counter()
    weights = random_engine_weights(cfg, device, dtype)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    model = EngineModel(cfg, weights, max_batch=1, max_seq=max_seq)
    del weights
    on_gpu = device.type == "cuda"
    if on_gpu:
        model.compile()
    setup_s = time.perf_counter() - t0
    config = {"pretrained_config": cfg, "engine": {"arch": "gpu" if on_gpu else "cpu", "tp_size": 1},
              "build_config": {"max_batch_size": 1, "max_input_len": args.prompt, "max_seq_len": max_seq,
                               "max_num_tokens": max(args.prompt, 256)}}
    engine = Engine(Path(tempfile.mkdtemp(prefix="moe-bench-")), config, model, use_graphs=on_gpu)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt), generator=g).tolist()
    t1 = time.perf_counter()
    engine.generate(prompt, args.new)  # compile + capture
    warm_s = time.perf_counter() - t1
    runs = [engine.generate(prompt, args.new) for _ in range(args.runs)]
    dec = [(args.new - 1) / r.stats["decode_seconds"] for r in runs]
    tok_s = statistics.median(dec)
    w_bytes, kv_per_ctx = bytes_per_token(cfg, torch.finfo(dtype).bits // 8)
    step_bytes = w_bytes + kv_per_ctx * (args.prompt + args.new // 2)
    bw = copy_bandwidth(device)
    res = {"shape": "tiny" if args.tiny else "Mixtral-8x7B", "device": torch.cuda.get_device_name() if on_gpu else "cpu",
           "dtype": dtype_name, "engine_weight_bytes": nbytes, "active_weight_bytes_per_token": w_bytes,
           "kv_bytes_per_token_at_mean_ctx": step_bytes - w_bytes, "setup_seconds": round(setup_s, 1),
           "compile_and_capture_seconds": round(warm_s, 1), "decode_tok_s_bs1": tok_s, "decode_tok_s_all": dec,
           "copy_bandwidth_GBps": bw / 1e9, "roofline_tok_s_weights": bw / w_bytes, "roofline_tok_s": bw / step_bytes,
           "fraction_of_roofline": tok_s * step_bytes / bw, "greedy_head": runs[0].tokens[0][:16],
           "peak_gpu_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None}
    if on_gpu and "H200" in res["device"]:
        res["fraction_of_spec_4p8TBps"] = tok_s * step_bytes / 4.8e12
    print(f"{res['shape']} ({res['device']}, {dtype_name}, batch 1, prompt {args.prompt}, {args.new} new): "
          f"{tok_s:.1f} tok/s decode; roofline {res['roofline_tok_s']:.1f} tok/s "
          f"({step_bytes / 1e9:.2f} GB/token active weights + KV at {bw / 1e9:.0f} GB/s copy bandwidth) "
          f"-> {100 * res['fraction_of_roofline']:.1f}% of roofline")
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

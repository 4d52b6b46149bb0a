"""Engine benchmark (H100): Kiln's torch engine vs HF transformers eager and HF static cache + compile.

Synthesizes random bf16 checkpoints with the real Llama-3.2-1B / Llama-3.1-8B shapes directly on the
GPU machine (no weights travel), builds engines (cold compile cache), measures a fresh process's
load-to-first-token, batch-1 decode (128-token prompt, 256 new tokens), TTFT at 128 and 2,048
tokens, batch-32 throughput, and the HF baselines on the same machine, then prints one table.
``--tp 1,2`` also builds a tensor-parallel engine per shape (one process per GPU over NCCL) and
times it the same way.

    PYTHONPATH=. python3 benchmarks/engine_bench.py --shapes 1b,8b --hf --out $OUT
    PYTHONPATH=. python3 benchmarks/engine_bench.py --shapes 1b,8b --tp 1,2 --work /dev/shm/eb --out $OUT
    PYTHONPATH=. python3 benchmarks/engine_bench.py --shapes 1b --variants default,cdt --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "1b": dict(name="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_size=64, vocab_size=128256, tie=True,
               rope_factor=32.0),
    "8b": dict(name="Llama-3.1-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_size=128, vocab_size=128256, tie=False,
               rope_factor=8.0),
    # CPU shapes: "tiny" (quant_speed_bench.py's profile: 4 layers, hidden 512), "micro" (h200_targets.py --tiny)
    "tiny": dict(name="tiny-Llama (4 x 512)", hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_size=64, vocab_size=32000, tie=False,
                 rope_factor=8.0),
    "micro": dict(name="micro-Llama (2 x 256)", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_size=64, vocab_size=4096, tie=False,
                  rope_factor=8.0),
}
VARIANTS = {  # Inductor settings tried for the decode/prefill graphs (env of a fresh process)
    "default": {},
    "cdt": {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"},
    "autotune": {"TORCHINDUCTOR_MAX_AUTOTUNE": "1", "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM": "1"},
    "pool": {"KILN_COMPILE_THREADS": "16"},  # kernels of a cache hit loaded by a compile-worker pool
}
PROMPT, NEW, TTFT_LONG, BIG_BATCH = 128, 256, 2048, 32


def trt_config(s: dict, tp: int = 1) -> dict:
    from service.compiler.models.hf_config import base_quantization

    return {
        "architecture": "LlamaForCausalLM", "dtype": "bfloat16", "logits_dtype": "float32",
        "vocab_size": s["vocab_size"], "max_position_embeddings": 131072, "hidden_size": s["hidden_size"],
        "num_hidden_layers": s["num_hidden_layers"], "num_attention_heads": s["num_attention_heads"],
        "num_key_value_heads": s["num_key_value_heads"], "head_size": s["head_size"],
        "intermediate_size": s["intermediate_size"], "hidden_act": "silu", "norm_epsilon": 1e-5,
        "position_embedding_type": "rope_gpt_neox", "rotary_base": 500000.0,
        "rotary_scaling": {"factor": s["rope_factor"], "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3", "type": "llama3"},
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1}, "quantization": base_quantization(),
        "use_parallel_embedding": False, "embedding_sharding_dim": 0, "mlp_bias": False, "attn_bias": False,
        "residual_mlp": False, "tie_word_embeddings": s["tie"], "qk_layernorm": False,
    }


def synth_checkpoint(shape: str, out: Path, std: float = 0.02, seed: int = 0, tp: int = 1) -> float:
    """Random bf16 weights made on the GPU, written as a TensorRT-LLM checkpoint split ``tp`` ways
    (each rank's own random slices: speed does not depend on the values); returns seconds."""
    from service.compiler.checkpoint.safetensors_io import SafetensorsWriter, dtype_name
    from service.compiler.models.llama import LLAMA

    t0 = time.perf_counter()
    cfg = trt_config(SHAPES[shape], tp)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator(device="cuda").manual_seed(seed)
    for rank in range(tp):
        names = LLAMA.expected(cfg, rank)
        with SafetensorsWriter(out / f"rank{rank}.safetensors", [(n, dtype_name(d), s) for n, s, d in names]) as w:
            for name, shp, dt in names:
                if len(shp) == 1:
                    t = torch.ones(shp, dtype=dt)
                else:
                    t = (torch.randn(shp, generator=g, device="cuda", dtype=torch.float32) * std).to(dt).cpu()
                w.write(name, 0, t)
    return time.perf_counter() - t0


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t0)


def decode_bytes(shape: str, ctx: int) -> int:
    """Bytes read per batch-1 decode step (performance.md §1.2): weights minus the embedding + KV."""
    from service.compiler.build.config import estimate_weight_bytes, kv_bytes_per_token

    s = SHAPES[shape]
    cfg = trt_config(s)
    # estimate_weight_bytes counts embedding + head (2*V*H); the embedding is a gather, the head (tied
    # or not) is read whole
    w = estimate_weight_bytes(cfg, "bfloat16") - s["vocab_size"] * s["hidden_size"] * 2
    return w + kv_bytes_per_token(cfg, "bfloat16") * ctx


def prompts(n: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


# -- workers (each in a fresh process) --------------------------------------------------------------
def worker_engine(engine_dir: str, shape: str, long: bool, big: bool) -> dict:
    engine, res = fresh_start(engine_dir, shape)
    vocab = SHAPES[shape]["vocab_size"]
    p1 = prompts(1, PROMPT, vocab)
    for _ in range(2):
        engine.generate(p1, NEW)
    runs = [engine.generate(p1, NEW).stats for _ in range(3)]
    dec = [(NEW - 1) / r["decode_seconds"] for r in runs]
    res["bs1_decode_tok_s"] = statistics.median(dec)
    res["bs1_decode_tok_s_all"] = dec
    res["bs1_e2e_tok_s"] = statistics.median(NEW / (r["prefill_seconds"] + r["decode_seconds"]) for r in runs)
    res["ttft128_s"] = statistics.median(engine.generate(p1, 1).stats["ttft_seconds"] for _ in range(5))
    res["greedy_head"] = engine.generate(p1, 16).tokens[0]
    if long:
        pl = prompts(1, TTFT_LONG, vocab, seed=2)
        engine.generate(pl, 1)
        res["ttft2048_s"] = statistics.median(engine.generate(pl, 1).stats["ttft_seconds"] for _ in range(5))
    if big:
        pb = prompts(BIG_BATCH, PROMPT, vocab, seed=3)
        engine.generate(pb, NEW)
        st = engine.generate(pb, NEW).stats
        res["bs32_tok_s"] = BIG_BATCH * NEW / (st["prefill_seconds"] + st["decode_seconds"])
        res["bs32_decode_tok_s"] = BIG_BATCH * (NEW - 1) / st["decode_seconds"]
    res["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    try:
        res["kernels"] = profile_decode(engine, p1)
    except Exception as exc:  # the breakdown is a diagnosis; never lose the measurements for it
        res["kernels"] = {"error": repr(exc)}
    return res


def fresh_start(engine_dir: str, shape: str):
    """A fresh process's start: imports, Engine.load phases, first token, then a first full 128+256
    generation (decode graphs load from the shipped cache and are captured), with Inductor's counters
    (what had to be compiled or benchmarked in this process). Returns (engine, figures)."""
    import psutil

    created = psutil.Process().create_time()
    res = {"import_torch_s": time.time() - created}  # torch is imported at the top of this file
    from service.compiler.engine.engine import Engine

    res["import_engine_s"] = time.time() - created
    prof_path = os.environ.get("KILN_STARTUP_PROFILE")  # cProfile of load + first token (inflates both)
    if prof_path:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    engine = Engine.load(engine_dir)
    res["load"] = engine.load_stats
    vocab = SHAPES[shape]["vocab_size"]
    first = engine.generate(prompts(1, PROMPT, vocab), 1)
    res["first_ttft_s"] = first.stats["ttft_seconds"]
    res["load_to_first_token_s"] = time.perf_counter() - t0
    if prof_path:
        import io
        import pstats

        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
        stats.print_stats(80)
        stats.sort_stats("tottime").print_stats(40)
        Path(prof_path).write_text(buf.getvalue())
    res["process_start_to_first_token_s"] = time.time() - created
    from torch._dynamo.utils import counters

    res["first_token_compile_counters"] = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}
    engine.generate(prompts(1, PROMPT, vocab), NEW)
    res["process_start_to_first_full_generation_s"] = time.time() - created
    res["all_counters"] = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}
    cache = engine.load_stats.get("compile_cache")
    if cache:  # what this process had to write into the shipped cache (its misses)
        new = [str(f.relative_to(cache)) for f in Path(cache).rglob("*")
               if f.is_file() and f.stat().st_mtime > created and not f.name.endswith(".lock")]
        res["cache_files_written"] = len(new)
        res["cache_files_written_head"] = sorted(new)[:40]
    return engine, res


def profile_decode(engine, prompt: list[list[int]], steps: int = 20) -> dict:
    """CUDA time per kernel of the compiled decode step run without its graph (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    engine.generate(prompt, 1)
    with torch.inference_mode():
        for _ in range(3):
            engine._step_eager(1, 512)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine._step_eager(1, 512)
            torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    rows = [e for e in prof.key_averages() if getattr(e, "device_type", cuda) == cuda and e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows)
    top = [{"kernel": e.key[:90], "us_per_step": e.device_time_total / steps, "calls_per_step": e.count / steps}
           for e in rows[:14]]
    return {"kernel_us_per_step": total / steps, "kernels_per_step": sum(e.count for e in rows) / steps, "top": top}


def hf_model(shape: str, device: str = "cuda"):
    """transformers' LlamaForCausalLM with the shape's config, random bf16 weights made on ``device``."""
    import transformers

    s = SHAPES[shape]
    cfg = transformers.LlamaConfig(
        hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_size"], vocab_size=s["vocab_size"], tie_word_embeddings=s["tie"], rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": s["rope_factor"], "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    return model


def worker_hf(shape: str, mode: str) -> dict:
    import transformers

    s = SHAPES[shape]
    model = hf_model(shape)
    ids = torch.tensor(prompts(1, PROMPT, s["vocab_size"]), device="cuda")
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    if mode == "static_compile":  # transformers compiles the decode step itself once the cache is static
        kw["cache_implementation"] = "static"
        model.generation_config.compile_config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    times = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(3 if mode == "static_compile" else 2):
            torch.cuda.synchronize()
            a = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - a)
    return {"tok_s": NEW / min(times[1:]), "first_call_s": times[0], "total_s": time.perf_counter() - t0}


def spawn(args: list[str], env_extra: dict | None = None, timeout: float = 900, tp: int = 1) -> dict:
    """Run a worker in a fresh process (``tp`` processes, one per rank and GPU, for a tp engine,
    through the build's own rank launcher); rank 0's JSON, or the failure."""
    from service.compiler.engine.ranks import run_ranks

    t0 = time.perf_counter()
    try:
        outs = run_ranks([__file__, *args], tp, what="the worker", timeout_s=timeout, env_extra=env_extra)
    except (RuntimeError, TimeoutError) as exc:
        return {"error": str(exc)[-3000:], "wall_s": time.perf_counter() - t0}
    out = json.loads(outs[0].strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--hf", action="store_true", help="also run HF eager and HF static cache + compile")
    ap.add_argument("--hf-modes", default="eager,static_compile", help="e.g. 1b=eager+static_compile;8b=static_compile")
    ap.add_argument("--long", default="8b", help="shapes that also measure TTFT at 2,048 tokens")
    ap.add_argument("--big", default="1b,8b", help="shapes that also measure batch-32 throughput")
    ap.add_argument("--work", default="/tmp/kiln-engine-bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--fresh-only", type=int, default=0, metavar="N",
                    help="only build and time N fresh-process starts per variant (no decode/HF runs)")
    ap.add_argument("--worker", choices=["engine", "hf", "start"], help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--flags", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tp", default="1", help="tp sizes to build and time per shape, e.g. 1,2 (tp>1: that many GPUs)")
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--init-method", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker in ("engine", "start"):  # a tp engine's rank joins its group first (NCCL, its GPU)
        from service.compiler.engine.ranks import join_group, leave_group

        join_group(a.engine, a.rank, a.world_size, a.init_method)
        try:  # the engine is gone (its graphs released) when the worker function returns
            if a.worker == "engine":
                res = worker_engine(a.engine, a.shape, "long" in a.flags, "big" in a.flags)
            else:
                res = fresh_start(a.engine, a.shape)[1]
        finally:
            leave_group()
        if a.rank == 0:
            print(json.dumps(res))
        return 0
    if a.worker == "hf":
        print(json.dumps(worker_hf(a.shape, a.mode)))
        return 0

    from service.compiler.build import BuildConfig, build

    work = Path(a.work)
    out = Path(a.out) if a.out else work
    out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    meta = {"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "copy_bandwidth_TBps": bw / 1e12}
    print(json.dumps(meta), flush=True)
    results: dict = {"meta": meta, "shapes": {}}
    tps = [int(t) for t in a.tp.split(",")]
    if max(tps) > torch.cuda.device_count():
        ap.error(f"--tp {a.tp} needs {max(tps)} GPUs; this machine has {torch.cuda.device_count()}")
    for shape in a.shapes.split(","):
        r: dict = {}
        results["shapes"][shape] = r
        for tp in tps:
            sfx = "" if tp == 1 else f"_tp{tp}"  # tp=1 keys as before
            shutil.rmtree(work / shape, ignore_errors=True)
            ckpt, engine = work / shape / "ckpt", work / shape / "engine"
            r["synth_s" + sfx] = synth_checkpoint(shape, ckpt, tp=tp)
            torch.cuda.empty_cache()
            bc = BuildConfig(max_batch_size=BIG_BATCH, max_input_len=TTFT_LONG, max_seq_len=TTFT_LONG + NEW,
                             dtype="bfloat16", target="auto", keep_tensor_parallel=tp > 1)
            t0 = time.perf_counter()
            r["build_stats" + sfx] = build(ckpt, bc, engine)
            r["cold_build_s" + sfx] = time.perf_counter() - t0
            print(shape, f"tp={tp}", "build", json.dumps(r["build_stats" + sfx]), flush=True)
            shutil.rmtree(ckpt, ignore_errors=True)
            flags = ",".join(x for x, on in (("long", shape in a.long), ("big", shape in a.big)) if on)
            for v in a.variants.split(",") if a.fresh_only else []:
                for i in range(a.fresh_only):
                    r[f"start_{v}{sfx}_{i}"] = spawn(["--worker", "start", "--engine", str(engine), "--shape",
                                                      shape], VARIANTS[v], tp=tp)
                    print(shape, "start", v, i, json.dumps(r[f"start_{v}{sfx}_{i}"]), flush=True)
                    (out / "engine_bench.json").write_text(json.dumps(results, indent=2))
            for v in a.variants.split(",") if not a.fresh_only else []:
                r[f"engine_{v}{sfx}"] = spawn(["--worker", "engine", "--engine", str(engine), "--shape", shape,
                                               "--flags", flags], VARIANTS[v], tp=tp)
                print(shape, v, f"tp={tp}", json.dumps(r[f"engine_{v}{sfx}"]), flush=True)
                (out / "engine_bench.json").write_text(json.dumps(results, indent=2))
        if a.hf and not a.fresh_only:
            modes = a.hf_modes.split(",")
            if "=" in a.hf_modes:
                per = dict(x.split("=") for x in a.hf_modes.split(";"))
                modes = [m for m in per.get(shape, "").split("+") if m]
            for mode in modes:
                r[f"hf_{mode}"] = spawn(["--worker", "hf", "--shape", shape, "--mode", mode])
                print(shape, "hf", mode, json.dumps(r[f"hf_{mode}"]), flush=True)
                (out / "engine_bench.json").write_text(json.dumps(results, indent=2))
        shutil.rmtree(work / shape, ignore_errors=True)
        (out / "engine_bench.json").write_text(json.dumps(results, indent=2))
    if not a.fresh_only:
        print_table(results)
    return 0


def print_table(results: dict) -> None:
    bw = results["meta"]["copy_bandwidth_TBps"] * 1e12
    spec = 4.8e12 if "H200" in results["meta"]["device"] else 3.35e12  # HBM spec bandwidth per GPU
    print(f"\n{results['meta']['device']}, torch {results['meta']['torch']}, copy {bw / 1e12:.2f} TB/s; "
          f"bf16, {PROMPT}-token prompt, {NEW} new tokens, random weights")
    print("| shape | variant | tp | decode tok/s bs1 | e2e tok/s bs1 | % spec roofline | TTFT@128 ms | TTFT@2048 ms | "
          "bs32 tok/s | fresh process start->1st token s | cold build s | HF eager tok/s | HF static+compile tok/s |")
    print("|" + "---|" * 13)

    def f(x, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for shape, r in results["shapes"].items():
        hf = {m: r.get(f"hf_{m}", {}) for m in ("eager", "static_compile")}
        hfs = {m: (f"{v['tok_s']:.1f}" if "tok_s" in v else ("err" if v else "-")) for m, v in hf.items()}
        for key, e in r.items():
            if not key.startswith("engine_"):
                continue
            variant, _, tp = key[7:].partition("_tp")
            tp = int(tp or 1)
            sfx = "" if tp == 1 else f"_tp{tp}"
            if "error" in e:
                print(f"| {shape} | {variant} | {tp} | ERROR {e['error'][-300:]!r} |")
                continue
            # each GPU reads about 1/tp of the bytes (weights and KV heads split; the norms, replicated, are tiny)
            roof = e["bs1_decode_tok_s"] * decode_bytes(shape, PROMPT + NEW // 2) / tp / spec
            ttft2k = e.get("ttft2048_s")
            print(f"| {SHAPES[shape]['name']} | {variant} | {tp} | {e['bs1_decode_tok_s']:.1f} | {e['bs1_e2e_tok_s']:.1f} | "
                  f"{100 * roof:.0f}% | {1e3 * e['ttft128_s']:.1f} | {f(ttft2k and 1e3 * ttft2k, '.1f')} | "
                  f"{f(e.get('bs32_tok_s'), '.0f')} | {e['process_start_to_first_token_s']:.1f} | "
                  f"{r['cold_build_s' + sfx]:.0f} | {hfs['eager']} | {hfs['static_compile']} |")


if __name__ == "__main__":
    from service.compiler.engine.ranks import exit_rank

    exit_rank(main())

"""Where a 128-token prefill's time goes, per engine (GPU): TTFT samples, the CPU time the calling
thread spends in them, and a profiler table (CPU-side operators and GPU kernels).

    PYTHONPATH=. python3 benchmarks/prefill_profile.py --engines DIR[,DIR...] [--out DIR]

Engines: built ones, e.g. the ``engine-bf16`` / ``engine-W4A16`` folders ``quant_engine_bench.py``
leaves in its ``--work`` folder. Each engine runs in this process one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def profile(engine_dir: str, prompt: int, samples: int) -> dict:
    from service.compiler.engine.engine import Engine

    engine = Engine.load(engine_dir)
    ids = [torch.randint(0, engine.model.vocab, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()]
    for _ in range(3):
        engine.generate(ids, 4)
    ttft, cpu, wall = [], [], []
    for _ in range(samples):
        c0, w0 = time.process_time(), time.perf_counter()
        st = engine.generate(ids, 1).stats
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        ttft.append(st["ttft_seconds"])
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            engine.generate(ids, 1)
    avg = p.key_averages()
    cpu_table = avg.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
    gpu_table = avg.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60)
    del engine
    torch.cuda.empty_cache()
    return {"engine": engine_dir, "ttft_ms": [1e3 * t for t in ttft], "ttft_median_ms": 1e3 * statistics.median(ttft),
            "call_cpu_ms_median": 1e3 * statistics.median(cpu), "call_wall_ms_median": 1e3 * statistics.median(wall),
            "cpu_table": cpu_table, "gpu_table": gpu_table}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", required=True)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    res = [profile(e, a.prompt, a.samples) for e in a.engines.split(",")]
    with open(os.path.join(a.out, "prefill_profile.json"), "w") as f:
        json.dump(res, f, indent=1)
    for r in res:
        print(f"\n== {r['engine']}: TTFT median {r['ttft_median_ms']:.2f} ms (samples "
              + ", ".join(f"{t:.1f}" for t in r["ttft_ms"]) + f"); one call: wall {r['call_wall_ms_median']:.2f} ms,"
              f" CPU {r['call_cpu_ms_median']:.2f} ms")
        print(r["cpu_table"])
        print(r["gpu_table"])


if __name__ == "__main__":
    main()

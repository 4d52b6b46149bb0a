"""Per-build performance report of a torch engine: ``performance.json`` in the engine directory.

Measured once the engine is complete (after the compile cache is filled, on GPU): load time,
warmup time (compile from the shipped cache + CUDA-graph capture), time to first token of one
prompt, decode tokens/s at batch 1 and at ``max_batch_size``, and peak GPU memory
(``torch.cuda.max_memory_allocated`` over load + measurement; null with a reason on the CPU).
Short on purpose: a 16-token prompt and 16 new tokens (fewer where the engine's limits or a time
budget say so), the median of a few repetitions (5 on GPU, 2 on the CPU) after untimed runs that
compile and capture what the timed ones use.

    python -m service.compiler.engine.performance ENGINE_DIR      # prints the report as JSON

GPU builds run it in a fresh process (what a server pays at start-up: the load reads the
shipped compile cache); CPU builds call ``measure_performance`` in the build process; a tp engine
is timed by one fresh process per rank (``--rank/--world-size/--init-method``), rank 0 reporting.

    python -m service.compiler.engine.performance ENGINE_DIR --rank R --world-size 2 \\
        --init-method tcp://127.0.0.1:29500                       # once per rank
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .ranks import add_rank_arguments, exit_rank, join_group, leave_group, run_ranks

PERFORMANCE_FILE = "performance.json"
PERFORMANCE_VERSION = 1
PROMPT_TOKENS = 16
NEW_TOKENS = 16
# the headline numbers, in the order the API and dashboard show them
KEYS = ("build_seconds", "load_seconds", "ttft_seconds", "decode_tokens_per_second_batch_1",
        "decode_tokens_per_second_max_batch", "peak_gpu_memory_bytes")


def _across_ranks(value: int, op: str) -> int:
    """``value`` reduced (min or max) over the ranks of a tp engine's process group; itself otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(t.item())


def _prompt(vocab: int, n: int) -> list[int]:
    return [(7 * i + 3) % vocab for i in range(n)]


def _decode_rate(engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, float]:
    """(median decode tokens/s over the batch, median seconds of one run): tokens after the first
    (which prefill produces) divided by the decode loop's time."""
    rates, runs = [], []
    for _ in range(repeats):
        out = engine.generate(prompts, new_tokens)
        steps = len(out.tokens[0]) - 1
        rates.append(len(prompts) * steps / max(out.stats["decode_seconds"], 1e-9))
        runs.append(out.stats["prefill_seconds"] + out.stats["decode_seconds"])
    return statistics.median(rates), statistics.median(runs)


def measure_performance(engine_dir: str | Path, *, repeats: int | None = None, budget_s: float = 60.0) -> dict:
    """Load the engine and time it; the report (``KEYS`` plus the conditions they were taken under)."""
    from .engine import Engine

    engine_dir = Path(engine_dir)
    config = json.loads((engine_dir / "config.json").read_text())
    tp = int(config.get("engine", {}).get("tp_size", 1))
    on_gpu = torch.cuda.is_available() and config.get("engine", {}).get("arch") != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = Engine.load(engine_dir)
    load_s = time.perf_counter() - t0
    gpu = engine.device.type == "cuda"
    t1 = time.perf_counter()
    if gpu:
        engine.warmup()
    warmup_s = time.perf_counter() - t1
    repeats = repeats or (5 if gpu else 2)
    prompt_len = max(1, min(PROMPT_TOKENS, engine.max_input, engine.max_seq - 2))
    new = min(NEW_TOKENS, engine.max_seq - prompt_len)
    if new < 2:
        engine.close()
        return not_measured(f"max_seq_len={engine.max_seq} leaves no room to time decoding", tp_size=tp,
                            load_seconds=round(load_s, 4))
    prompt = _prompt(engine.model.vocab, prompt_len)

    engine.generate([prompt], new)  # untimed: first prefill of this shape, decode graphs of batch 1
    ttfts = [engine.generate([prompt], 1).stats["prefill_seconds"] for _ in range(repeats)]
    rate_1, run_1 = _decode_rate(engine, [prompt], new, repeats)
    b = engine.max_batch
    new_b = new
    per_token_b = run_1 / new * b * repeats  # worst case: the batch costs b times batch 1
    if not gpu and per_token_b * new > budget_s:  # a big model on the CPU: fewer tokens
        new_b = max(2, int(budget_s / per_token_b))
    new_b = _across_ranks(new_b, "min")  # every rank of a tp engine must run the same steps
    if gpu:
        engine.generate([prompt] * b, new_b)  # untimed: this batch's graphs at this span
    rate_b, _ = _decode_rate(engine, [prompt] * b, new_b, repeats)

    report = {
        "version": PERFORMANCE_VERSION,
        "backend": "torch",
        "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "tp_size": tp,
        "build_seconds": None,  # filled in by the build
        "load_seconds": round(load_s, 4),
        "warmup_seconds": round(warmup_s, 4),
        "ttft_seconds": round(statistics.median(ttfts), 6),
        "decode_tokens_per_second_batch_1": round(rate_1, 2),
        "decode_tokens_per_second_max_batch": round(rate_b, 2),
        "max_batch_size": b,
        "prompt_tokens": prompt_len,
        "new_tokens": {"batch_1": new, "max_batch": new_b},
        "repeats": repeats,
        "peak_gpu_memory_bytes": None,
        "peak_gpu_memory_reason": "CPU engine: no GPU memory is used",
    }
    if gpu:  # a tp engine reports its busiest rank
        report["peak_gpu_memory_bytes"] = _across_ranks(int(torch.cuda.max_memory_allocated(engine.device)), "max")
        report["peak_gpu_memory_reason"] = None if tp == 1 else f"the largest of the {tp} ranks' peaks"
    engine.close()  # a tp engine's captured graphs would hold up the process group's end
    return report


def not_measured(reason: str, **fields) -> dict:
    """The report of an engine this build could not time (every headline value null, and why)."""
    return {"version": PERFORMANCE_VERSION, **{k: None for k in KEYS}, "reason": reason, **fields}


def measure_in_build(engine_dir: Path, *, gpu: bool, tp: int, timeout_s: float = 1800) -> dict:
    """The build's measurement: in this process for a one-rank CPU engine; in a fresh process for a
    GPU engine (a clean peak-memory count, and a load that reads the shipped compile cache as a
    server's does); in ``tp`` fresh processes, one per rank (gloo on the CPU, nccl on GPUs), for a tp
    engine. The report is rank 0's timings."""
    if tp == 1 and not gpu:
        return measure_performance(engine_dir)
    if gpu and tp > torch.cuda.device_count():
        return not_measured(f"a tp={tp} engine is timed on {tp} GPUs; this machine has "
                            f"{torch.cuda.device_count()}", tp_size=tp)
    outs = run_ranks(["-m", "service.compiler.engine.performance", str(engine_dir)], tp, what="measuring the engine",
                     timeout_s=timeout_s)
    return json.loads(outs[0].strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.compiler.engine.performance")
    parser.add_argument("engine_dir")
    parser.add_argument("--repeats", type=int, default=None)
    add_rank_arguments(parser)
    args = parser.parse_args(argv)
    join_group(args.engine_dir, args.rank, args.world_size, args.init_method)
    try:  # the engine is gone when measure_performance returns (a live tp engine blocks the group's end)
        report = measure_performance(args.engine_dir, repeats=args.repeats)
    finally:
        leave_group()
    if args.rank == 0:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    exit_rank(main())

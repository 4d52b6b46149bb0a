"""Issue 18's table in one script: Kiln's public CLI and ``Engine.load(...).generate(...)`` beside HF
static cache + torch.compile, random weights with the real Llama shapes, one device call per shape.

Each row is printed as soon as it is measured (stdout, and ``$OUT/table.md`` when ``$OUT`` is set), so a
call cut off at its time limit still returns what it measured. Row groups, in this order:

* ``bf16``  — random bf16 HF folder (made on the GPU) -> ``kiln convert`` -> cold ``kiln build`` (max batch 32,
  max input 2,048, max seq 2,304; performance measured as the CLI does by default) -> a fresh process:
  ``Engine.load`` + first ``generate`` (weights from the page cache), batch-1 decode (128-token prompt, 256
  new tokens, median of 3), TTFT at 128 and 2,048 tokens (medians of 5), batch 8 and batch 32 decode.
* ``quant`` — ``kiln convert --quantization FP8`` at the default calibration (128 x 512) and with
  ``--fast``; FP8 and W4A16 engines (``kiln build --no-measure``, same limits) timed like bf16 at batch 1,
  with their ratio to this call's bf16 decode (a bf16 engine is built for it when ``bf16`` is not run).
* ``engines`` — ``quant`` without its two convert-timing rows (FP8 converted with ``--fast``); ``--algos``
  picks the engines, e.g. ``--only bf16,engines --algos W4A16``.
* ``hf``    — HF ``generate`` with a static cache + torch.compile at batch 1, 8 and 32 (the same prompts).

Disk: at most the HF folder + one checkpoint + one engine at a time (8B: ~34 GB; the HF folder is made again
for ``quant`` after the bf16 engine is gone). ``--work`` defaults to /tmp (disk); /dev/shm also works.

    PYTHONPATH=. python3 benchmarks/h200_targets.py --shape 8b --only bf16,hf --out $OUT   # ~7 min on an H200
    PYTHONPATH=. python3 benchmarks/h200_targets.py --shape 8b --only quant --out $OUT     # ~8 min
    PYTHONPATH=. python3 benchmarks/h200_targets.py --shape 1b --out $OUT                  # every group
    PYTHONPATH=. python3 benchmarks/h200_targets.py --tiny                                 # CPU smoke run (2 x 256 Llama), minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import engine_bench as eb  # noqa: E402
from quant_engine_bench import add_word_tokenizer, synth_hf  # noqa: E402

PROMPT, NEW, LONG = eb.PROMPT, eb.NEW, eb.TTFT_LONG
BATCHES = (8, 32)
BUILD_FLAGS = ["--max-batch-size", "32", "--max-input-len", str(LONG), "--max-seq-len", str(LONG + NEW)]


def use_tiny_sizes() -> None:
    """--tiny (CPU): short prompts and generations, small engines, no build-time measuring."""
    global PROMPT, NEW, LONG, BUILD_FLAGS
    PROMPT, NEW, LONG = 16, 4, 64
    eb.PROMPT, eb.NEW = PROMPT, NEW  # engine_bench.fresh_start reads these
    BUILD_FLAGS = ["--max-batch-size", "32", "--max-input-len", str(LONG), "--max-seq-len", str(LONG + NEW)]
TARGETS = {  # issue 18 (H200): row -> target text
    "decode": {"8b": ">= 250 tok/s", "1b": ">= 1,100 tok/s"},
    "ttft2048": {"8b": "<= 40 ms"}, "ttft128": {"8b": "<= 15 ms"}, "first_token": {"8b": "<= 8 s"},
    "fp8_ratio": {"8b": ">= 1.7x"}, "w4a16_ratio": {"8b": ">= 2.0x"},
    "convert_fp8": {"8b": "<= 90 s"}, "convert_fp8_fast": {"8b": "<= 30 s"}, "build": {"8b": "<= 90 s"},
}


class Table:
    """Rows printed (and appended to ``$OUT/table.md``) one at a time, as they are measured."""

    def __init__(self, shape: str, out: Path | None):
        self.shape, self.path, self.rows = shape, (out / "table.md") if out else None, []

    def head(self, text: str) -> None:
        self._emit(f"\n{text}\n\n| row | measured | target | detail |\n|---|---:|---|---|")

    def row(self, key: str, name: str, value: str, detail: str = "") -> None:
        target = TARGETS.get(key, {}).get(self.shape, "")
        self.rows.append({"key": key, "name": name, "value": value, "detail": detail})
        self._emit(f"| {name} | {value} | {target} | {detail} |")

    def _emit(self, line: str) -> None:
        print(line, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(line + "\n")


def run_cli(args: list[str], timeout: float = 900) -> dict:
    """``kiln ARGS --json --quiet`` in a fresh process (the public CLI): its JSON summary + wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "service.cli", *args, "--json", "--quiet"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"kiln {' '.join(args[:1])} failed ({p.returncode}): {(p.stderr or p.stdout)[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


def spawn(args: list[str], timeout: float = 900) -> dict:
    """A worker of this script in a fresh process; its JSON (last stdout line), or the failure."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


# -- workers (fresh processes) ---------------------------------------------------------------------
def worker_engine(engine_dir: str, shape: str, full: bool) -> dict:
    """Fresh process: Engine.load + first token (engine_bench.fresh_start), batch-1 decode; ``full``:
    TTFT at 128 and 2,048 tokens and batch 8 / 32 decode too."""
    engine, res = eb.fresh_start(engine_dir, shape)
    vocab = eb.SHAPES[shape]["vocab_size"]
    p1 = eb.prompts(1, PROMPT, vocab)
    engine.generate(p1, NEW)
    runs = [engine.generate(p1, NEW).stats for _ in range(3)]
    res["bs1_decode_tok_s"] = statistics.median((NEW - 1) / r["decode_seconds"] for r in runs)
    if full:
        res["ttft128_s"] = statistics.median(engine.generate(p1, 1).stats["ttft_seconds"] for _ in range(5))
        pl = eb.prompts(1, LONG, vocab, seed=2)
        engine.generate(pl, 1)
        res["ttft2048_s"] = statistics.median(engine.generate(pl, 1).stats["ttft_seconds"] for _ in range(5))
        if engine.prefill_graph_tokens:  # the default prefill graphs against the eager prefill, same process
            graphed_tokens = engine.generate(p1, 32).tokens
            engine.set_prefill_graphs(False)
            engine.generate(p1, 1)
            res["ttft128_eager_prefill_s"] = statistics.median(
                engine.generate(p1, 1).stats["ttft_seconds"] for _ in range(5))
            res["prefill_graphs_same_tokens"] = engine.generate(p1, 32).tokens == graphed_tokens
            engine.set_prefill_graphs(True)
        for b in BATCHES:
            pb = eb.prompts(b, PROMPT, vocab, seed=3)
            engine.generate(pb, NEW)
            st = [engine.generate(pb, NEW).stats for _ in range(2)]
            res[f"bs{b}_decode_tok_s"] = max(b * (NEW - 1) / s["decode_seconds"] for s in st)
            res[f"bs{b}_e2e_tok_s"] = max(b * NEW / (s["prefill_seconds"] + s["decode_seconds"]) for s in st)
    if torch.cuda.is_available():
        res["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if full and torch.cuda.is_available():
        res["weights_loaders"] = time_loaders(Path(engine_dir) / "rank0.safetensors")
    if full and os.environ.get("KILN_PROFILE_DIR"):
        profile_engine(engine, p1, eb.prompts(1, LONG, vocab, seed=2), Path(os.environ["KILN_PROFILE_DIR"]), shape)
    res.pop("all_counters", None)
    return res


def time_loaders(path: Path, rounds: int = 2) -> dict:
    """The engine file into GPU memory from the page cache: safetensors' load_file (what Engine.load used)
    against Kiln's parallel reader (what it uses now), alternating; seconds, the best of ``rounds`` each."""
    from safetensors.torch import load_file

    from service.compiler.engine.weights import load_weights

    times: dict[str, list[float]] = {"load_file": [], "load_weights": []}
    for _ in range(rounds):
        for name, fn in (("load_file", lambda: load_file(str(path), device="cuda")),
                         ("load_weights", lambda: load_weights(path, "cuda"))):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            w = fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            del w
            torch.cuda.empty_cache()
    return {"gb": path.stat().st_size / 1e9, **{k: min(v) for k, v in times.items()}}


def profile_engine(engine, short: list, long: list, out: Path, shape: str) -> None:
    """Profiler tables (kernels by total GPU time) of a batch-1 generate of 32 tokens after a 128-token
    prompt (the graph-replayed decode steps) and of a 2,048-token prefill, as the engine runs them."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, prompts, new in (("decode", short, 33), ("prefill2048", long, 1)):
        with profile(activities=acts) as prof:
            engine.generate(prompts, new)
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (out / f"profile_{shape}_{name}.txt").write_text(
            f"{shape} {name}: batch 1, {len(prompts[0])}-token prompt, {new} new tokens\n"
            + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))


def worker_hf(shape: str, batches: list[int]) -> dict:
    """HF generate, static cache + torch.compile (transformers compiles the decode step), per batch size:
    tokens/s of whole generate() calls (best of the calls after the first, which compiles)."""
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = eb.hf_model(shape, device)
    model.generation_config.compile_config = transformers.CompileConfig(
        fullgraph=True, mode="reduce-overhead" if device == "cuda" else "default")
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, cache_implementation="static")
    res: dict = {}
    with torch.inference_mode():
        for b in batches:
            ids = torch.tensor(eb.prompts(b, PROMPT, eb.SHAPES[shape]["vocab_size"], seed=3 if b > 1 else 1),
                               device=device)
            times = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                model.generate(ids, **kw)
                sync()
                times.append(time.perf_counter() - t0)
            res[f"bs{b}_tok_s"] = b * NEW / min(times[1:])
            res[f"bs{b}_first_call_s"] = times[0]
    return res


# -- the groups ------------------------------------------------------------------------------------
def make_hf(shape: str, hf: Path, tiny: bool) -> float:
    """The random bf16 HF folder of the shape (on the GPU when there is one) with a word-level tokenizer
    over the bundled calibration text (so the CLI calibrates on real text windows)."""
    t0 = time.perf_counter()
    synth_hf(shape, hf, device="cuda" if torch.cuda.is_available() else "cpu")
    add_word_tokenizer(hf, eb.SHAPES[shape]["vocab_size"])
    return time.perf_counter() - t0


def engine_rows(table: Table, label: str, r: dict, full: bool) -> None:
    if "error" in r:
        table.row("error", f"{label}: worker failed", "ERROR", repr(r["error"][-300:]))
        return
    load = r.get("load", {})
    table.row("decode", f"{label} decode, batch 1", f"{r['bs1_decode_tok_s']:.1f} tok/s")
    if not full:
        return
    table.row("first_token", f"{label} new process: Engine.load + first generate",
              f"{r['load_to_first_token_s']:.2f} s",
              f"process start -> first token {r['process_start_to_first_token_s']:.2f} s; Engine.load "
              f"{load.get('load_seconds', float('nan')):.2f} s (weights {load.get('weights_seconds', float('nan')):.2f}"
              f" s); first generate (TTFT) {r['first_ttft_s']:.2f} s")
    table.row("ttft128" if PROMPT == 128 else "ttft_short", f"{label} TTFT, {PROMPT}-token prompt",
              f"{1e3 * r['ttft128_s']:.1f} ms")
    table.row("ttft2048" if LONG == 2048 else "ttft_long", f"{label} TTFT, {LONG}-token prompt",
              f"{1e3 * r['ttft2048_s']:.1f} ms")
    if "ttft128_eager_prefill_s" in r:
        table.row("ttft_eager", f"{label} TTFT, {PROMPT}-token prompt, eager prefill (KILN_PREFILL_GRAPHS=0, same "
                  "process)", f"{1e3 * r['ttft128_eager_prefill_s']:.1f} ms",
                  f"the default prefill graphs are {r['ttft128_eager_prefill_s'] / r['ttft128_s']:.2f}x faster; "
                  f"same greedy tokens: {r['prefill_graphs_same_tokens']}")
    if "weights_loaders" in r:
        w = r["weights_loaders"]
        table.row("weights", f"{label} engine file ({w['gb']:.1f} GB, page cache) -> GPU", f"{w['load_weights']:.2f} s",
                  f"Kiln's parallel reader, {w['gb'] / w['load_weights']:.1f} GB/s; safetensors load_file "
                  f"{w['load_file']:.2f} s ({w['gb'] / w['load_file']:.1f} GB/s); best of 2 each, alternating")
    for b in BATCHES:
        table.row(f"bs{b}", f"{label} decode, batch {b}", f"{r[f'bs{b}_decode_tok_s']:.0f} tok/s",
                  f"end to end (prefill + decode) {r[f'bs{b}_e2e_tok_s']:.0f} tok/s")


def group_bf16(shape: str, work: Path, table: Table, tiny: bool, res: dict) -> None:
    name = eb.SHAPES[shape]["name"]
    hf, ckpt, engine = work / "hf", work / "ckpt", work / "engine-bf16"
    res["synth_s"] = make_hf(shape, hf, tiny)
    res["convert_bf16"] = run_cli(["convert", str(hf), str(ckpt)])
    shutil.rmtree(hf)  # disk: one HF folder + one checkpoint + one engine at most
    b = res["build_bf16"] = run_cli(["build", str(ckpt), str(engine), *BUILD_FLAGS, *(["--no-measure"] if tiny else [])])
    perf = b.get("performance", {})
    table.row("build", f"cold `kiln build` {name} bf16", f"{b['seconds']:.1f} s",
              f"build {b.get('build_seconds', float('nan')):.1f} s + timing; command wall {b['wall_s']:.1f} s"
              + (f"; performance.json bs1 {perf['decode_tokens_per_second_batch_1']:.1f} tok/s"
                 if perf.get("decode_tokens_per_second_batch_1") else ""))
    shutil.rmtree(ckpt)
    r = res["engine_bf16"] = spawn(["--worker", "engine", "--engine", str(engine), "--shape", shape, "--full"])
    engine_rows(table, f"{name} bf16", r, full=True)
    shutil.rmtree(engine)


def group_quant(shape: str, work: Path, table: Table, tiny: bool, res: dict, base: float | None,
                converts: bool = True, algos: tuple[str, ...] = ("FP8", "W4A16")) -> None:
    """FP8 converts (default, --fast; ``converts``), then the engines of ``algos``, then (without this call's
    bf16 group) a bf16 engine for the ratios. Without ``converts`` (group ``engines``) the FP8 checkpoint is
    converted with --fast: the engine's speed does not depend on the calibration. Disk: HF folder + at most
    two checkpoints or one + an engine."""
    name = eb.SHAPES[shape]["name"]
    hf = work / "hf"
    if not hf.exists():
        res["synth_quant_s"] = make_hf(shape, hf, tiny)
    calib = ["--calibration-samples", "16", "--calibration-seq-len", "128"] if tiny else []
    what = "16 x 128 (--tiny)" if tiny else "128 x 512, the default"
    for key, flags, label in (("convert_fp8", [], "GPTQ rounding (default)"),
                              ("convert_fp8_fast", ["--fast"], "--fast: max calibration")) if converts else ():
        out = work / ("q-FP8" if key == "convert_fp8" else "q-fp8-fast")
        c = res[key] = run_cli(["convert", str(hf), str(out), "--quantization", "FP8", *flags, *calib])
        t = c.get("timings", {})
        table.row(key, f"`kiln convert --quantization FP8` {name}, {label}, calibration {what}",
                  f"{c['wall_s']:.1f} s", f"summary {c['seconds']:.1f} s: load {t.get('load_s', 0):.1f}, calibration "
                  f"{t.get('calibration_s', 0):.1f}, quantize {t.get('quantize_s', 0):.1f}, write "
                  f"{t.get('write_s', 0):.1f}, other {t.get('other_s', 0):.1f} s")
        if key == "convert_fp8_fast":
            shutil.rmtree(out)
    decode: dict[str, float] = {}
    for algo in list(algos) + (["bf16"] if base is None else []):
        ckpt = work / f"q-{algo}"
        if not ckpt.exists():
            fast = ["--fast"] if algo == "FP8" and not converts else []
            res[f"convert_{algo}"] = run_cli(["convert", str(hf), str(ckpt),
                                              *([] if algo == "bf16" else ["--quantization", algo, *fast, *calib])])
        if algo == "bf16":
            shutil.rmtree(hf)  # the last user of the HF folder
        engine = work / f"engine-{algo}"
        res[f"build_{algo}"] = run_cli(["build", str(ckpt), str(engine), *BUILD_FLAGS, "--no-measure"])
        shutil.rmtree(ckpt)
        r = res[f"engine_{algo}"] = spawn(["--worker", "engine", "--engine", str(engine), "--shape", shape])
        shutil.rmtree(engine)
        if "error" in r:
            engine_rows(table, f"{name} {algo}", r, full=False)
            continue
        decode[algo] = r["bs1_decode_tok_s"]
        label = " (the ratios' base)" if algo == "bf16" else ""
        table.row("decode" if algo == "bf16" else f"{algo.lower()}_decode", f"{name} {algo} decode, batch 1{label}",
                  f"{decode[algo]:.1f} tok/s", f"build (--no-measure) {res[f'build_{algo}']['seconds']:.0f} s")
    shutil.rmtree(hf, ignore_errors=True)
    base = base if base is not None else decode.get("bf16")
    for algo in algos:
        if algo in decode and base:
            table.row(f"{algo.lower()}_ratio", f"{name} {algo} decode / bf16, batch 1", f"{decode[algo] / base:.2f}x",
                      f"{decode[algo]:.1f} / {base:.1f} tok/s")


def group_hf(shape: str, table: Table, res: dict) -> None:
    name = eb.SHAPES[shape]["name"]
    r = res["hf"] = spawn(["--worker", "hf", "--shape", shape], timeout=1200)
    if "error" in r:
        table.row("error", f"{name} HF static cache + torch.compile", "ERROR", repr(r["error"][-300:]))
        return
    for b in (1, *BATCHES):
        table.row(f"hf_bs{b}", f"{name} HF static cache + torch.compile, batch {b}", f"{r[f'bs{b}_tok_s']:.1f} tok/s",
                  f"whole generate() calls; first call (compiles) {r[f'bs{b}_first_call_s']:.1f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["8b", "1b", "micro"], default="8b", help="8b, 1b (micro: same as --tiny)")
    ap.add_argument("--tiny", action="store_true",
                    help="the CPU smoke run: a 2-layer, 256-wide Llama, short prompts, small calibration")
    ap.add_argument("--only", default="bf16,quant,hf",
                    help="row groups to run, in this order: bf16, quant, hf; or engines (the quantized engines' "
                         "decode without quant's convert-timing rows)")
    ap.add_argument("--algos", default="FP8,W4A16", help="the quantized engines of quant / engines")
    ap.add_argument("--work", default="/tmp/kiln-h200-targets")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for table.md + h200_targets.json (default $OUT)")
    ap.add_argument("--worker", choices=["engine", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    shape = "micro" if a.tiny else a.shape
    tiny = shape == "micro"
    if tiny:
        use_tiny_sizes()
    if a.worker == "engine":
        print(json.dumps(worker_engine(a.engine, a.shape, a.full), default=str))
        return 0
    if a.worker == "hf":
        print(json.dumps(worker_hf(a.shape, [1, *BATCHES])))
        return 0
    groups = [g.strip() for g in a.only.split(",") if g.strip()]
    if set(groups) - {"bf16", "quant", "engines", "hf"}:
        ap.error(f"unknown group in --only {a.only!r}")
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) / shape
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    table = Table(shape, out)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {"device": device, "torch": torch.__version__, "shape": shape, "groups": groups}
    if torch.cuda.is_available():
        meta["copy_bandwidth_TBps"] = eb.copy_bandwidth() / 1e12
    results: dict = {"meta": meta}
    table.head(f"{eb.SHAPES[shape]['name']} on {device} (torch {torch.__version__}"
               + (f", copy {meta['copy_bandwidth_TBps']:.2f} TB/s" if "copy_bandwidth_TBps" in meta else "")
               + f"); random weights, {PROMPT}-token prompt, {NEW} new tokens, greedy")
    t0 = time.perf_counter()
    try:
        for g in groups:
            if g == "bf16":
                group_bf16(shape, work, table, tiny, results)
            elif g in ("quant", "engines"):
                base = results.get("engine_bf16", {}).get("bs1_decode_tok_s")
                group_quant(shape, work, table, tiny, results, base, converts=g == "quant",
                            algos=tuple(x for x in a.algos.split(",") if x))
            else:
                group_hf(shape, table, results)
            if out:
                (out / "h200_targets.json").write_text(json.dumps(results, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        results["wall_s"] = time.perf_counter() - t0
        if out:
            (out / "h200_targets.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\ndone in {results['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B of the torch engine between two source trees, side by side in one GPU call.

Each tree (a copy of the repository's ``service/`` and ``benchmarks/``, e.g. an older commit made with
``git archive OLD service benchmarks | tar -x -C .ab/old``) builds its own engine from the same random
bf16 checkpoint (the real Llama shapes of ``engine_bench.SHAPES``), then fresh processes of each tree
time batch-1 decode (128-token prompt, 256 new tokens; ``engine_bench --worker engine``), the trees
alternating ``--rounds`` times so drift of the card shows in both columns. Prints one table: the median
of every round's median, and new / old.

    PYTHONPATH=. python3 benchmarks/ab_decode.py --old .ab/old --new . --shapes 1b,8b --rounds 2 --out $OUT
    # one engine (built by the new tree), TTFT at 2,048 too, and the new tree once more with prefill graphs on
    PYTHONPATH=. python3 benchmarks/ab_decode.py --old .ab/old --shapes 8b --rounds 1 --one-engine --long \\
        --extra graphs:KILN_PREFILL_GRAPHS=1 --out $OUT
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


def _run(tree: Path, args: list[str], timeout: float, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, **(env_extra or {}), PYTHONPATH=str(tree.resolve()), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    # cwd = the tree: the build's rank processes run `python -m service...` from the working directory
    p = subprocess.run([sys.executable, *args], env=env, cwd=tree.resolve(), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-2000:], "wall_s": time.perf_counter() - t0}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def stage_build(shape: str, ckpt: Path, engine: Path, synth: bool) -> dict:
    """Run inside one tree's interpreter (PYTHONPATH=tree): that tree's engine_bench and build."""
    import importlib.util

    import torch

    tree = Path(os.environ["PYTHONPATH"])
    spec = importlib.util.spec_from_file_location("engine_bench", tree / "benchmarks" / "engine_bench.py")
    eb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eb)
    from service.compiler.build import BuildConfig, build

    res: dict = {}
    if synth:
        res["synth_s"] = eb.synth_checkpoint(shape, ckpt)
    torch.cuda.empty_cache()
    bc = BuildConfig(max_batch_size=eb.BIG_BATCH, max_input_len=eb.TTFT_LONG, max_seq_len=eb.TTFT_LONG + eb.NEW,
                     dtype="bfloat16", target="auto", measure_performance=False)
    t0 = time.perf_counter()
    build(ckpt, bc, engine)
    res["build_s"] = time.perf_counter() - t0
    return res


def _variants(a) -> list[tuple[str, Path, dict]]:
    """(name, tree, extra env): old, new, then each --extra NAME:KEY=VAL[,KEY=VAL] on the new tree."""
    out = [("old", a.old, {}), ("new", a.new, {})]
    for spec in a.extra:
        name, _, env = spec.partition(":")
        out.append((name, a.new, dict(kv.split("=", 1) for kv in env.split(",") if kv)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, help="tree A (older code)")
    ap.add_argument("--new", type=Path, default=Path("."), help="tree B (this code)")
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--long", action="store_true", help="also time TTFT at 2,048 tokens")
    ap.add_argument("--one-engine", action="store_true",
                    help="build one engine with the new tree and time every variant on it (the engine format "
                         "is the same; the old tree then compiles what its code does differently)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME:KEY=VAL[,KEY=VAL]",
                    help="a further variant: the new tree with these environment variables, e.g. "
                         "graphs:KILN_PREFILL_GRAPHS=1 ('{out}' in a value is replaced by --out)")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/kiln-ab"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--stage", choices=["build"], help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--engine", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--synth", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage == "build":
        print(json.dumps(stage_build(a.shape, a.ckpt, a.engine, a.synth)))
        return 0
    if a.old is None:
        ap.error("--old is required")
    out = a.out or a.work
    out.mkdir(parents=True, exist_ok=True)
    variants = _variants(a)
    me = str(Path(__file__).resolve())
    results: dict = {}
    for shape in a.shapes.split(","):
        r: dict = {name: [] for name, _, _ in variants}
        results[shape] = r
        shutil.rmtree(a.work / shape, ignore_errors=True)
        ckpt = a.work / shape / "ckpt"
        builders = [("new", a.new)] if a.one_engine else [("old", a.old), ("new", a.new)]
        for i, (name, tree) in enumerate(builders):
            engine = a.work / shape / f"engine-{name}"
            b = _run(tree, [me, "--stage", "build", "--shape", shape, "--ckpt", str(ckpt), "--engine", str(engine),
                            *(["--synth"] if i == 0 else [])], timeout=900)
            r[f"build_{name}"] = b
            print(shape, name, "build", json.dumps(b), flush=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        for rnd in range(a.rounds):
            for name, tree, env in variants:
                engine = a.work / shape / ("engine-new" if a.one_engine or name != "old" else "engine-old")
                e = _run(tree, [str(tree.resolve() / "benchmarks" / "engine_bench.py"), "--worker", "engine",
                                "--engine", str(engine), "--shape", shape, "--flags", "long" if a.long else ""],
                         timeout=900, env_extra={k: v.replace("{out}", str(out)) for k, v in env.items()})
                e.pop("kernels", None)
                r[name].append(e)
                print(shape, name, f"round {rnd}", json.dumps({k: e.get(k) for k in (
                    "bs1_decode_tok_s", "ttft128_s", "ttft2048_s", "load_to_first_token_s", "greedy_head", "error")}),
                    flush=True)
                (out / "ab_decode.json").write_text(json.dumps(results, indent=2))
        shutil.rmtree(a.work / shape, ignore_errors=True)
    print("\n| shape | variant | decode tok/s bs1 (rounds) | / old | TTFT@128 ms | TTFT@2048 ms | "
          "load + first token s | same greedy tokens as old |")
    print("|---|---|---|---|---|---|---|---|")

    def med(runs: list[dict], key: str, scale: float = 1.0) -> float:
        vals = [e[key] * scale for e in runs if key in e]
        return statistics.median(vals) if vals else float("nan")

    for shape, r in results.items():
        base = med(r["old"], "bs1_decode_tok_s")
        head = next((e["greedy_head"] for e in r["old"] if "greedy_head" in e), None)
        for name, _, _ in variants:
            runs = r[name]
            cols = ", ".join(f"{e['bs1_decode_tok_s']:.1f}" if "bs1_decode_tok_s" in e else "ERR" for e in runs)
            dec = med(runs, "bs1_decode_tok_s")
            same = next((e["greedy_head"] == head for e in runs if "greedy_head" in e), None)
            print(f"| {shape} | {name} | {dec:.1f} ({cols}) | {dec / base:.3f} | {med(runs, 'ttft128_s', 1e3):.1f} | "
                  f"{med(runs, 'ttft2048_s', 1e3):.1f} | {med(runs, 'load_to_first_token_s'):.2f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

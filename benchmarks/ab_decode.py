"""A/B of the torch engine between two source trees, side by side in one GPU call.

Each tree (a copy of the repository's ``service/`` and ``benchmarks/``, e.g. an older commit made with
``git archive OLD service benchmarks | tar -x -C .ab/old``) builds its own engine from the same random
bf16 checkpoint (the real Llama shapes of ``engine_bench.SHAPES``), then fresh processes of each tree
time batch-1 decode (128-token prompt, 256 new tokens; ``engine_bench --worker engine``), the trees
alternating ``--rounds`` times so drift of the card shows in both columns. Prints one table: the median
of every round's median, and new / old.

    PYTHONPATH=. python3 benchmarks/ab_decode.py --old .ab/old --new . --shapes 1b,8b --rounds 2 --out $OUT
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


def _run(tree: Path, args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), PYTHONUNBUFFERED="1")
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, help="tree A (older code)")
    ap.add_argument("--new", type=Path, default=Path("."), help="tree B (this code)")
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--rounds", type=int, default=2)
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
    trees = {"old": a.old, "new": a.new}
    me = str(Path(__file__).resolve())
    results: dict = {}
    for shape in a.shapes.split(","):
        r: dict = {"old": [], "new": []}
        results[shape] = r
        shutil.rmtree(a.work / shape, ignore_errors=True)
        ckpt = a.work / shape / "ckpt"
        for i, (name, tree) in enumerate(trees.items()):
            engine = a.work / shape / f"engine-{name}"
            b = _run(tree, [me, "--stage", "build", "--shape", shape, "--ckpt", str(ckpt), "--engine", str(engine),
                            *(["--synth"] if i == 0 else [])], timeout=900)
            r[f"build_{name}"] = b
            print(shape, name, "build", json.dumps(b), flush=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        for rnd in range(a.rounds):
            for name, tree in trees.items():
                e = _run(tree, [str(tree.resolve() / "benchmarks" / "engine_bench.py"), "--worker", "engine",
                                "--engine", str(a.work / shape / f"engine-{name}"), "--shape", shape, "--flags", ""],
                         timeout=900)
                e.pop("kernels", None)
                r[name].append(e)
                print(shape, name, f"round {rnd}", json.dumps({k: e.get(k) for k in (
                    "bs1_decode_tok_s", "bs1_decode_tok_s_all", "ttft128_s", "greedy_head", "error")}), flush=True)
                (out / "ab_decode.json").write_text(json.dumps(results, indent=2))
        shutil.rmtree(a.work / shape, ignore_errors=True)
    print("\n| shape | old decode tok/s bs1 (rounds) | new decode tok/s bs1 (rounds) | new/old | "
          "old TTFT@128 ms | new TTFT@128 ms | same greedy tokens |")
    print("|---|---|---|---|---|---|---|")
    for shape, r in results.items():
        med = {}
        for name in trees:
            ok = [e for e in r[name] if "bs1_decode_tok_s" in e]
            med[name] = statistics.median(e["bs1_decode_tok_s"] for e in ok) if ok else float("nan")
        cols = {n: ", ".join(f"{e['bs1_decode_tok_s']:.1f}" if "bs1_decode_tok_s" in e else "ERR" for e in r[n])
                for n in trees}
        ttft = {n: statistics.median([e["ttft128_s"] * 1e3 for e in r[n] if "ttft128_s" in e] or [float("nan")])
                for n in trees}
        heads = {n: next((e["greedy_head"] for e in r[n] if "greedy_head" in e), None) for n in trees}
        print(f"| {shape} | {med['old']:.1f} ({cols['old']}) | {med['new']:.1f} ({cols['new']}) | "
              f"{med['new'] / med['old']:.3f} | {ttft['old']:.1f} | {ttft['new']:.1f} | {heads['old'] == heads['new']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

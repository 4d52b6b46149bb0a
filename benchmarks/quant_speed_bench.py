"""FP8 quantize time, before/after: two source trees side by side, alternating, medians.

Each tree (e.g. the previous commit: ``git archive OLD service benchmarks | tar -x -C /tmp/old``) quantizes the
same random-weight Llama HF folder (``engine_bench.SHAPES``; a word-level tokenizer over the bundled text, so
calibration reads real text windows) with FP8, GPTQ rounding (the default) and plain max calibration (the fast
path), in a fresh process each (``quantize_checkpoint`` on ``from_hugging_face``, what ``kiln convert
--quantization FP8`` runs), the trees alternating ``--rounds`` times. Prints the median seconds per tree and
method, the new tree's per-part times (load / calibration / quantize / write) and whether the two trees wrote
identical bytes.

    PYTHONPATH=. python3 benchmarks/quant_speed_bench.py --old /tmp/old --shape tiny --rounds 3     # CPU
    PYTHONPATH=. python3 benchmarks/quant_speed_bench.py --old /tmp/old --shape 8b --rounds 1 \\
        --samples 128 --seq-len 512 --work /dev/shm/qsb --out $OUT                                  # H200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RUN = """
import json, sys, time
t0 = time.perf_counter()
from service.compiler.convert import from_hugging_face
from service.compiler.quantization import CalibrationSettings, QuantConfig, quantize_checkpoint
hf, out, method, n, L = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model = from_hugging_face(hf, dtype="auto")
try:
    s = quantize_checkpoint(model, out, QuantConfig("FP8", fp8_gptq=method == "gptq"),
                            calibration=CalibrationSettings(samples=n, seq_len=L))
finally:
    model.close()
print(json.dumps({"seconds": s.seconds, "timings": getattr(s, "timings", {}), "process_s": time.perf_counter() - t0}))
"""


def run(tree: Path, hf: Path, out: Path, method: str, samples: int, seq_len: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", RUN, str(hf), str(out), method, str(samples), str(seq_len)],
                       cwd=tree.resolve(), env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{tree} {method}: {p.stderr[-2000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    res["sha256"] = hashlib.sha256((out / "rank0.safetensors").read_bytes()).hexdigest()
    shutil.rmtree(out)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="tree A (older code)")
    ap.add_argument("--new", type=Path, default=REPO, help="tree B (this code)")
    ap.add_argument("--shape", default="tiny", help="engine_bench.SHAPES key (tiny: 4 layers, hidden 512)")
    ap.add_argument("--methods", default="gptq,max")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kiln-quant-speed"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    import engine_bench
    import torch
    from quant_engine_bench import add_word_tokenizer, synth_hf

    shutil.rmtree(a.work, ignore_errors=True)
    hf = a.work / "hf"
    synth_hf(a.shape, hf, device="cuda" if torch.cuda.is_available() else "cpu")
    add_word_tokenizer(hf, engine_bench.SHAPES[a.shape]["vocab_size"])
    trees = {"old": a.old, "new": a.new}
    res: dict = {m: {t: [] for t in trees} for m in a.methods.split(",")}
    for r in range(a.rounds):
        for m in res:
            for t, tree in (trees.items() if r % 2 == 0 else reversed(list(trees.items()))):
                res[m][t].append(run(tree, hf, a.work / f"q-{t}", m, a.samples, a.seq_len))
                print(r, m, t, json.dumps(res[m][t][-1]), flush=True)
    shutil.rmtree(a.work, ignore_errors=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    name = engine_bench.SHAPES[a.shape]["name"]
    lines = [f"\n{name}, FP8, calibration {a.samples} x {a.seq_len}, {dev}; medians of {a.rounds} (quantize_checkpoint "
             "seconds; the process also imports torch)\n",
             "| method | old s | new s | new / old | new: load / calibration / quantize / write / other s | "
             "same bytes |", "|---|---:|---:|---:|---|---|"]
    for m, per in res.items():
        old = statistics.median(x["seconds"] for x in per["old"])
        new = statistics.median(x["seconds"] for x in per["new"])
        parts = " / ".join(f"{statistics.median(x['timings'].get(k + '_s', 0) for x in per['new']):.1f}"
                           for k in ("load", "calibration", "quantize", "write", "other"))
        same = {x["sha256"] for x in per["old"]} == {x["sha256"] for x in per["new"]}
        label = {"gptq": "GPTQ rounding (default)", "max": "max calibration (`--fast`)"}.get(m, m)
        lines.append(f"| {label} | {old:.1f} | {new:.1f} | {new / old:.2f} | {parts} | {'yes' if same else 'NO'} |")
    print("\n".join(lines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "quant_speed_bench.json").write_text(json.dumps(res, indent=2))
        (a.out / "quant_speed_bench.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

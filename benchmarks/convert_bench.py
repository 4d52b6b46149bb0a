#!/usr/bin/env python
"""Conversion throughput: Kiln vs. `cp -r` (the I/O ceiling) vs. the naive transformers route.

Synthetic Llama checkpoints with the exact shapes of Llama-3.2-1B and Llama-3.2-3B (random bfloat16
weights, HF layout: config.json, model-0000X-of-0000N.safetensors shards <= 2 GB and
model.safetensors.index.json) are written once into --data-dir, streamed tensor by tensor so that
writing them never holds the model in memory. For every shape and tp size, three methods run side
by side, each in its own child process:

  cp     `cp -r SRC OUT`                                   copying the same bytes: the I/O ceiling
  kiln   `python -m service.cli convert SRC OUT --dtype bfloat16 --tp-size N` (bf16 -> bf16 needs no cast,
         so it takes the torch-free route: byte ranges and numpy slices, no `import torch`)
  naive  transformers `from_pretrained(dtype=bfloat16)`, state dict remapped to TensorRT-LLM names
         (fused qkv, mlp.fc/gate/proj, lm_head) with the TP split, `safetensors.torch.save_file`
         per rank -- what a hand-written conversion script does

Measured per run: wall time of the child plus an fsync of every output file it wrote (Kiln fsyncs
its own output; cp and save_file do not, so every method is timed to durable output), GB/s =
bytes of source safetensors / seconds, and the child's peak RSS (os.wait4 rusage ru_maxrss).
All runs are warm-cache: dropping the page cache needs privileges we do not have, so instead the
source files are read once before every run (the source is always in the page cache, for every
method alike). Medians over --repeat runs (naive: --naive-repeat, default 1); methods are
interleaved run by run. After each case, Kiln's and the naive route's outputs are compared
tensor by tensor (same names, shapes, dtypes and bytes) unless --no-verify.

    python benchmarks/convert_bench.py                          # 1b,3b x tp 1,2, table on stdout
    python benchmarks/convert_bench.py --shapes 1b --tp 1 --repeat 5 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_SHARD_BYTES = 2_000_000_000  # "<= 2 GB" per shard
CHUNK_ELEMS = 16 << 20  # random values generated 16 Mi elements (32 MB of bf16) at a time
METHODS = ("cp", "kiln", "naive")

# Llama-3.2 shapes (config.json as published, transformers 4.x spelling: rope_scaling + rope_theta)
SHAPES: dict[str, dict] = {
    "1b": {"name": "Llama-3.2-1B", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192},
    "3b": {"name": "Llama-3.2-3B", "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192},
    # a few hundred MB, for trying the script out (not in the default set)
    "tiny": {"name": "tiny-llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 32, "intermediate_size": 512},
}


def hf_config(shape: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": shape["head_dim"],
        "hidden_act": "silu",
        "hidden_size": shape["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": shape["intermediate_size"],
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": shape["num_attention_heads"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }


def hf_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the HF checkpoint, in the order HF writes them."""
    H, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, H))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (H,)),
            (p + "self_attn.q_proj.weight", (nh * d, H)),
            (p + "self_attn.k_proj.weight", (nkv * d, H)),
            (p + "self_attn.v_proj.weight", (nkv * d, H)),
            (p + "self_attn.o_proj.weight", (H, nh * d)),
            (p + "post_attention_layernorm.weight", (H,)),
            (p + "mlp.gate_proj.weight", (inter, H)),
            (p + "mlp.up_proj.weight", (inter, H)),
            (p + "mlp.down_proj.weight", (H, inter)),
        ]
    out.append(("model.norm.weight", (H,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (V, H)))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shard_plan(tensors: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    """One safetensors file, header first, then each tensor's random bf16 values chunk by chunk."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in tensors:
            n = _numel(shape)
            norm = name.endswith("norm.weight")
            for start in range(0, n, CHUNK_ELEMS):
                k = min(CHUNK_ELEMS, n - start)
                if norm:
                    vals = torch.ones(k, dtype=torch.bfloat16)
                else:
                    vals = (torch.randn(k, generator=gen) * 0.02).to(torch.bfloat16)
                f.write(vals.view(torch.int16).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset


def ensure_checkpoint(data_dir: Path, key: str) -> Path:
    """The synthetic checkpoint of shape ``key`` under data_dir (written once, atomically)."""
    shape = SHAPES[key]
    dest = data_dir / f"synthetic-{shape['name']}"
    cfg = hf_config(shape)
    tensors = hf_tensors(cfg)
    shards = _shard_plan(tensors)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index_path = dest / "model.safetensors.index.json"
    if index_path.is_file() and (dest / "config.json").is_file():
        index = json.loads(index_path.read_text())
        if sorted(set(index["weight_map"].values())) == names and all((dest / n).is_file() for n in names):
            return dest
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    print(f"writing synthetic {shape['name']} checkpoint ({len(shards)} shards) to {dest} ...", file=sys.stderr)
    t0 = time.perf_counter()
    total = 0
    weight_map = {}
    for i, (name, part) in enumerate(zip(names, shards, strict=True)):
        _write_shard(tmp / name, part, seed=zlib.crc32(f"{key}/{i}".encode()))
        total += sum(2 * _numel(s) for _, s in part)
        weight_map.update({t: name for t, _ in part})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    print(f"  {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return dest


# --- the naive route (runs in a child process: `convert_bench.py --naive-child SRC OUT TP`) ------


def naive_child(src: str, out: str, tp: int) -> None:
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    t_import = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    sd = model.state_dict()
    t_load = time.perf_counter()

    H, V = hf["hidden_size"], hf["vocab_size"]
    nh, nkv = hf["num_attention_heads"], hf["num_key_value_heads"]
    d = hf.get("head_dim") or H // nh
    tied = hf.get("tie_word_embeddings", False)
    rope = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    scaling = None
    if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta",)}
        scaling["type"] = scaling["rope_type"] = rope.get("rope_type", rope.get("type"))
    os.makedirs(out)
    config = {
        "architecture": "LlamaForCausalLM", "dtype": "bfloat16", "logits_dtype": "float32",
        "vocab_size": V, "max_position_embeddings": hf["max_position_embeddings"], "hidden_size": H,
        "num_hidden_layers": hf["num_hidden_layers"], "num_attention_heads": nh, "num_key_value_heads": nkv,
        "head_size": d, "intermediate_size": hf["intermediate_size"], "hidden_act": "silu",
        "norm_epsilon": hf["rms_norm_eps"], "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rope_theta, "rotary_scaling": scaling,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "use_parallel_embedding": False, "embedding_sharding_dim": 0, "tie_word_embeddings": tied,
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    def split(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
        return torch.chunk(t, tp, dim=dim)[rank]

    def kv_split(t: torch.Tensor, rank: int) -> torch.Tensor:
        if nkv >= tp:
            return split(t, rank, 0)
        per = tp // nkv  # fewer KV heads than ranks: each head on tp // nkv consecutive ranks
        head = rank // per
        return t[head * d:(head + 1) * d]

    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    pad = -V % tp
    if pad:
        head = torch.cat([head, head.new_zeros(pad, H)])
    for rank in range(tp):
        w: dict[str, torch.Tensor] = {"transformer.vocab_embedding.weight": sd["model.embed_tokens.weight"]}
        for i in range(hf["num_hidden_layers"]):
            p, q = f"model.layers.{i}.", f"transformer.layers.{i}."
            w[q + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
            w[q + "attention.qkv.weight"] = torch.cat([
                split(sd[p + "self_attn.q_proj.weight"], rank, 0),
                kv_split(sd[p + "self_attn.k_proj.weight"], rank),
                kv_split(sd[p + "self_attn.v_proj.weight"], rank),
            ])
            w[q + "attention.dense.weight"] = split(sd[p + "self_attn.o_proj.weight"], rank, 1)
            w[q + "post_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
            w[q + "mlp.fc.weight"] = split(sd[p + "mlp.gate_proj.weight"], rank, 0)
            w[q + "mlp.gate.weight"] = split(sd[p + "mlp.up_proj.weight"], rank, 0)
            w[q + "mlp.proj.weight"] = split(sd[p + "mlp.down_proj.weight"], rank, 1)
        w["transformer.ln_f.weight"] = sd["model.norm.weight"]
        w["lm_head.weight"] = split(head, rank, 0).clone()  # tied: its own storage, save_file refuses shared
        w = {k: v.contiguous() for k, v in w.items()}
        save_file(w, os.path.join(out, f"rank{rank}.safetensors"), metadata={"format": "pt"})
        del w
    t_done = time.perf_counter()
    print(json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import, "convert_save_s": t_done - t_load}))


# --- measuring ----------------------------------------------------------------------------------


def _files(path: Path) -> list[Path]:
    return [p for p in sorted(path.rglob("*")) if p.is_file()] if path.exists() else []


def source_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in src.glob("*.safetensors"))


def warm(src: Path) -> None:
    """Read every source file once so that it is in the page cache (all runs are warm-cache)."""
    buf = bytearray(16 << 20)
    for p in _files(src):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def fsync_tree(path: Path) -> None:
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.exists():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    return env


def command(method: str, src: Path, out: Path, tp: int) -> list[str]:
    if method == "cp":
        return ["cp", "-r", str(src), str(out)]
    if method == "kiln":
        return [sys.executable, "-m", "service.cli", "convert", str(src), str(out), "--dtype", "bfloat16",
                "--tp-size", str(tp), "--quiet", "--json"]
    if method == "naive":
        return [sys.executable, str(Path(__file__).resolve()), "--naive-child", str(src), str(out), str(tp)]
    raise ValueError(method)


# The children are started by this small wrapper, never forked from the benchmark process itself:
# Linux carries a process's peak RSS across fork+exec, so a child of this (torch-importing) process
# would report at least this process's RSS as its own peak. The wrapper (python -I -S, ~10 MB) times
# the child and reads its peak RSS with os.wait4.
WRAPPER = """
import json, os, subprocess, sys, time
cmd, report = json.loads(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
p = subprocess.Popen(cmd)
_, status, usage = os.wait4(p.pid, 0)
seconds = time.perf_counter() - t0
with open(report, "w") as f:
    json.dump({"seconds": seconds, "rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}, f)
"""


def run_once(method: str, src: Path, out: Path, tp: int, nbytes: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    warm(src)
    cmd = command(method, src, out, tp)
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se, \
            tempfile.NamedTemporaryFile(suffix=".json") as report:
        rc = subprocess.run([sys.executable, "-I", "-S", "-c", WRAPPER, json.dumps(cmd), report.name],
                            stdout=so, stderr=se, env=child_env(), cwd=str(ROOT)).returncode
        t0 = time.perf_counter()
        fsync_tree(out)  # durable output for every method (Kiln already fsyncs; cp and save_file do not)
        fsync_s = time.perf_counter() - t0
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read().decode(errors="replace"), se.read().decode(errors="replace")
        if rc != 0:
            raise RuntimeError(f"benchmark wrapper failed (rc {rc}) for {' '.join(cmd)}\n{stderr[-3000:]}")
        rep = json.loads(Path(report.name).read_text())
    seconds = rep["seconds"] + fsync_s
    if rep["rc"] != 0:
        raise RuntimeError(f"{method} failed (rc {rep['rc']}): {' '.join(cmd)}\n{stderr[-3000:]}")
    run = {"seconds": seconds, "gb_per_s": nbytes / 1e9 / seconds, "peak_rss_bytes": rep["maxrss_kb"] * 1024,
           "fsync_s": fsync_s,
           "output_bytes": sum(p.stat().st_size for p in _files(out))}
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    if method == "kiln":
        summary = json.loads(last)
        run["in_process_s"] = summary["seconds"]
        run["torch_free"] = summary.get("torch_free")  # bf16 -> bf16: the byte-moving route, no torch import
    elif method == "naive":
        phases = json.loads(last)
        run.update(phases)
        run["in_process_s"] = phases["load_s"] + phases["convert_save_s"]
    return run


def verify_same(a: Path, b: Path) -> str:
    """Kiln's and the naive route's rank files: same tensor names, shapes, dtypes and bytes."""
    import torch
    from safetensors import safe_open

    ranks_a = sorted(p.name for p in a.glob("rank*.safetensors"))
    ranks_b = sorted(p.name for p in b.glob("rank*.safetensors"))
    if ranks_a != ranks_b:
        return f"MISMATCH: rank files {ranks_a} vs {ranks_b}"
    n = 0
    for name in ranks_a:
        with safe_open(str(a / name), framework="pt") as fa, safe_open(str(b / name), framework="pt") as fb:
            if set(fa.keys()) != set(fb.keys()):
                return f"MISMATCH: {name} tensors differ: {sorted(set(fa.keys()) ^ set(fb.keys()))[:5]}"
            for key in fa.keys():
                ta, tb = fa.get_tensor(key), fb.get_tensor(key)
                if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(ta.view(torch.int16),
                                                                                    tb.view(torch.int16)):
                    return f"MISMATCH: {name}:{key} {ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)}"
                n += 1
    return f"identical ({len(ranks_a)} rank files, {n} tensors)"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def settle(seconds: float) -> None:
    """Let earlier runs' writeback finish so each run starts from the same disk state (sync + pause)."""
    if seconds > 0:
        os.sync()
        time.sleep(seconds)


def run_case(key: str, tp: int, src: Path, work: Path, methods: list[str], repeats: dict[str, int],
             verify: bool, keep: bool, settle_s: float = 0.0) -> dict:
    nbytes = source_bytes(src)
    outs = {m: work / f"{key}-tp{tp}-{m}" for m in methods}
    samples: dict[str, list[dict]] = {m: [] for m in methods}
    # The naive route runs after every cp/Kiln repetition: its 1.3x-the-model RSS and its kept
    # output would otherwise push the source out of the page cache before the next Kiln run.
    plan = [(rep, m) for rep in range(max(repeats[m] for m in methods)) for m in methods
            if m != "naive" and rep < repeats[m]]
    plan += [(rep, "naive") for rep in range(repeats.get("naive", 0)) if "naive" in methods]
    for rep, m in plan:
        settle(settle_s)
        r = run_once(m, src, outs[m], tp, nbytes)
        samples[m].append(r)
        extra = f"  in-process {r['in_process_s']:.2f} s" if "in_process_s" in r else ""
        if m == "kiln":
            extra += "  torch-free" if r.get("torch_free") else "  torch route"
        print(f"  {key} tp={tp} {m:<5} run {rep + 1}: {r['seconds']:7.2f} s  {r['gb_per_s']:5.2f} GB/s  "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB{extra}", file=sys.stderr, flush=True)
        if m == "cp" and not keep:
            shutil.rmtree(outs[m], ignore_errors=True)
    check = None
    if verify and "kiln" in methods and "naive" in methods:
        check = verify_same(outs["kiln"], outs["naive"])
        print(f"  {key} tp={tp} kiln vs naive output: {check}", file=sys.stderr, flush=True)
    if not keep:
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
    summary = {}
    for m in methods:
        s = samples[m]
        summary[m] = {
            "runs": len(s),
            "seconds": median([r["seconds"] for r in s]),
            "gb_per_s": nbytes / 1e9 / median([r["seconds"] for r in s]),
            "peak_rss_bytes": int(median([r["peak_rss_bytes"] for r in s])),
            "in_process_s": median([r["in_process_s"] for r in s]) if s and "in_process_s" in s[0] else None,
            "fsync_s": median([r["fsync_s"] for r in s]),
            "samples": s,
        }
    return {"shape": key, "model": SHAPES[key]["name"], "tp": tp, "source_bytes": nbytes, "methods": summary,
            "kiln_vs_naive_output": check}


def table(results: list[dict]) -> str:
    lines = [
        "| shape | tp | method | seconds | GB/s | peak RSS | in-process s | fsync after exit s | time / cp "
        "| Kiln speedup over naive |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in results:
        ms = case["methods"]
        cp = ms.get("cp", {}).get("seconds")
        for m in METHODS:
            if m not in ms:
                continue
            r = ms[m]
            ratio = f"{r['seconds'] / cp:.2f}x" if cp else "-"
            speed = ""
            if m == "kiln" and "naive" in ms:
                speed = f"**{ms['naive']['seconds'] / r['seconds']:.2f}x**"
            inproc = f"{r['in_process_s']:.2f}" if r.get("in_process_s") is not None else "-"
            lines.append(
                f"| {case['model']} ({case['source_bytes'] / 1e9:.2f} GB) | {case['tp']} | {m} (n={r['runs']}) "
                f"| {r['seconds']:.2f} | {r['gb_per_s']:.2f} | {r['peak_rss_bytes'] / 2**20:,.0f} MiB | {inproc} "
                f"| {r['fsync_s']:.2f} | {ratio} | {speed} |")
    return "\n".join(lines)


def environment() -> dict:
    import psutil

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cache": "warm (source files read once before every run; page cache cannot be dropped without privileges)",
        "timing": "child wall time + fsync of its output files; medians",
    }
    for mod in ("torch", "transformers", "safetensors"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            env[mod] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    except OSError:
        pass
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--naive-child"]:
        naive_child(argv[1], argv[2], int(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1b,3b", help="comma-separated: " + ",".join(SHAPES))
    ap.add_argument("--tp", default="1,2", help="comma-separated tp sizes")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of cp,kiln,naive")
    ap.add_argument("--repeat", type=int, default=3, help="runs of cp and kiln per case (median reported)")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds of sync + pause before every run, so no run pays for the previous one's writeback")
    ap.add_argument("--naive-repeat", type=int, default=1, help="runs of the naive route per case")
    ap.add_argument("--data-dir", default=str(ROOT / "bench-data"),
                    help="where the synthetic checkpoints and outputs live (default ./bench-data, gitignored)")
    ap.add_argument("--json", metavar="FILE", help="also write all samples and medians as JSON")
    ap.add_argument("--no-verify", action="store_true", help="skip the kiln-vs-naive output comparison")
    ap.add_argument("--keep-outputs", action="store_true", help="leave the converted outputs in DATA_DIR/out")
    ap.add_argument("--out-dir", help="where outputs are written (default DATA_DIR/out); e.g. /dev/shm to time "
                                      "the conversion without this machine's disk (fsync is then a no-op)")
    ap.add_argument("--prepare-only", action="store_true", help="write the synthetic checkpoints and stop")
    args = ap.parse_args(argv)

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    tps = [int(t) for t in args.tp.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r} (known: {', '.join(SHAPES)})")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    repeats = {"cp": args.repeat, "kiln": args.repeat, "naive": args.naive_repeat}
    data_dir = Path(args.data_dir).absolute()
    sources = {s: ensure_checkpoint(data_dir, s) for s in shapes}
    if args.prepare_only:
        for s, p in sources.items():
            print(f"{s}: {p} ({source_bytes(p) / 1e9:.2f} GB)")
        return 0
    work = Path(args.out_dir).absolute() if args.out_dir else data_dir / "out"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = os.getloadavg()
    results = [run_case(s, tp, sources[s], work, methods, repeats, not args.no_verify, args.keep_outputs,
                        args.settle)
               for s in shapes for tp in tps]
    env = environment()
    env["loadavg_1_5_15_before"] = [round(x, 2) for x in load_before]
    env["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    env["wall_s"] = round(time.time() - started, 1)
    print(table(results))
    print(f"\n{env['cpu_count']} CPUs, {env['memory_gib']} GiB RAM, load average {load_before[0]:.1f} before / "
          f"{env['loadavg_1_5_15_after'][0]:.1f} after; all runs warm-cache (sources read before each run); "
          f"seconds = child wall time incl. fsync of its output; medians of n runs; {env['wall_s']:.0f} s in all.")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "argv": argv, "started": started,
                                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

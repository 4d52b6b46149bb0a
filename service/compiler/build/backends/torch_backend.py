"""The ``torch`` backend: a checkpoint -> Kiln's own engine directory (the default backend).

The engine directory (assembled under a temporary name, renamed into place when complete):

    config.json            {version, backend, pretrained_config, build_config, engine, build_stats}
    rank0.safetensors      the weights in the engine layout (fused qkv and gate_up, unpadded lm_head),
                           cast to the engine dtype, streamed tensor by tensor (rank1... for a tp
                           engine built with keep_tensor_parallel: one file per rank)
    compile_cache/sm90/    Inductor + Triton compile cache for the target arch (GPU builds only),
                           filled by a fresh process (one per rank, in its process group, for a tp
                           engine) that loads the engine and compiles + captures every graph, so a
                           later process on the same GPU type skips compiling
    tokenizer files        copied from the checkpoint folder when present
    performance.json       build / load time, time to first token, decode tokens/s at batch 1 and
                           max_batch_size, peak GPU memory (engine/performance.py), measured last

No weight is ever put inside a compiled artifact (an AOTInductor package with embedded weights
segfaulted on load on our H100): compiled code and weights travel separately.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...checkpoint.mapping import Mapping
from ...checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter, dtype_name, publish_dir
from ...checkpoint.validate import load_config
from ...engine.engine_quant import (
    TensorView,
    quantized_layer_specs,
    quantized_layer_tensors,
    quantized_slots,
)
from ...engine.performance import PERFORMANCE_FILE, measure_in_build, not_measured
from ...engine.ranks import run_ranks
from ...errors import InvalidCheckpoint, UnsupportedArchitecture
from ...models import spec_for_checkpoint
from ...version import __version__
from ..config import ResolvedBuild

ENGINE_VERSION = f"kiln-engine/1 (kiln {__version__})"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "vocab.json", "merges.txt")
CHUNK_ROWS_BYTES = 64 << 20
DECILM_ARCH = "DeciLMForCausalLM"
ProgressFn = Callable[[float, str], None]


def _checkpoint_tensors(ckpt_dir: Path, cfg: dict, rank: int | None = None
                        ) -> tuple[dict[str, torch.Tensor], list[SafetensorsFile]]:
    """Global-named checkpoint tensors: zero-copy views of rank0 for tp=pp=1 (or of ``rank``'s own
    file for a kept tp split), else merged ranks."""
    m = Mapping.from_dict(cfg["mapping"])
    if m.world_size == 1 or rank is not None:
        f = SafetensorsFile(ckpt_dir / f"rank{rank or 0}.safetensors")
        return {name: f.tensor(name) for name in f.keys()}, [f]
    try:
        from ...reference import load_checkpoint_weights  # type: ignore[attr-defined]
    except ImportError as exc:
        raise InvalidCheckpoint(
            f"{ckpt_dir} is split tp={m.tp_size} pp={m.pp_size}; merging it needs the reference runtime's "
            "load_checkpoint_weights, which is not importable here"
        ) from exc
    _, merged = load_checkpoint_weights(ckpt_dir)
    return merged, []


def engine_layout(cfg: dict) -> tuple[str, list[tuple[str, tuple[str, ...]]]]:
    """(layout name, engine weight map) of a checkpoint: its family's (``models/<family>.py``); every
    layout runs on the one engine model (``engine/model.py``)."""
    try:
        family = spec_for_checkpoint(cfg)
        if family.engine_layout is None:
            raise UnsupportedArchitecture("the torch engine has no layout for it")
        return family.engine_layout, family.engine_weight_map(cfg)
    except (UnsupportedArchitecture, ValueError) as exc:
        raise InvalidCheckpoint(f"no torch engine for this {cfg.get('architecture')} checkpoint: {exc}") from exc


def _quantized_engine_tensors(tensors: dict, cfg: dict, device: torch.device
                              ) -> tuple[dict[int, dict], Callable[[int], dict]]:
    """(layer -> name -> (dtype, shape) of its quantized engine tensors, from shapes alone; layer -> the
    tensors themselves, computed once per layer on ``device`` while writing, returned in host memory)."""
    quant = cfg.get("quantization") or {}
    if not (quant.get("quant_algo") or quant.get("kv_cache_quant_algo")):
        return {}, lambda i: {}

    def checked(fn: Callable[..., dict], source, i: int) -> dict:
        try:
            return fn(source, i, quant)
        except KeyError as exc:
            raise InvalidCheckpoint(f"quantized checkpoint lacks {exc.args[0]}") from exc

    specs = {i: checked(quantized_layer_specs, tensors, i) for i in range(int(cfg["num_hidden_layers"]))}
    source = TensorView(tensors, lambda t: t.to(device))  # a no-op on the CPU
    return specs, lambda i: {n: t.cpu() for n, t in checked(quantized_layer_tensors, source, i).items()}


def conversion_device() -> torch.device:
    """Where a build unpacks and repacks quantized weights: the GPU when there is one (one layer at a
    time; the same integer ops as on the CPU), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_engine_weights(ckpt_dir: Path, cfg: dict, dtype: torch.dtype, out: Path,
                         progress: ProgressFn | None = None, rank: int | None = None,
                         device: torch.device | None = None) -> int:
    """Stream the checkpoint (or one tp rank of it) into ``out`` in the engine layout; returns bytes.
    A quantized checkpoint's linears keep their stored FP8 / int8 / int4 weights (``engine_quant``),
    rearranged for the kernels on ``device`` (default ``conversion_device()``)."""
    tensors, files = _checkpoint_tensors(ckpt_dir, cfg, rank)
    try:
        layout, table = engine_layout(cfg)
        specs, qlayer = _quantized_engine_tensors(tensors, cfg, device or conversion_device())
        replaced = {f"layers.{i}.{s}" for i, spec in specs.items() for s in quantized_slots(spec, i)}
        table = [(n, src) for n, src in table if n not in replaced]
        vocab = int(cfg["vocab_size"]) if rank is None else tensors["lm_head.weight"].shape[0]  # padded slice
        # shapes first (the writer lays the file out before any byte is written)
        entries = [(n, dtype_name(dt), shape) for spec in specs.values() for n, (dt, shape) in spec.items()]
        for name, sources in table:
            missing = [s for s in sources if s not in tensors]
            if missing:
                raise InvalidCheckpoint(f"checkpoint lacks {', '.join(missing)} (needed for engine tensor {name})")
            shapes = [tuple(tensors[s].shape) for s in sources]
            rows = vocab if name == "lm_head" else sum(s[0] for s in shapes)
            entries.append((name, dtype_name(dtype), (rows, *shapes[0][1:])))
        total = 0
        with SafetensorsWriter(out, entries, metadata={"format": "pt", "layout": layout}) as w:
            for i in specs:
                for n, t in qlayer(i).items():
                    if (t.dtype, tuple(t.shape)) != specs[i][n]:  # the header was laid out from the specs
                        raise RuntimeError(f"{n}: {t.dtype} {tuple(t.shape)} != header {specs[i][n]}")
                    total += w.write(n, 0, t.contiguous())
            for n, (name, sources) in enumerate(table):
                offset = 0
                limit = vocab if name == "lm_head" else None  # drop the rows padding vocab to a multiple of tp
                for src in sources:
                    t = tensors[src][:limit] if limit is not None else tensors[src]
                    row_bytes = t[0].numel() * t.element_size() if t.dim() > 1 else CHUNK_ROWS_BYTES
                    step = max(1, CHUNK_ROWS_BYTES // max(row_bytes, 1)) if t.dim() > 1 else t.shape[0]
                    for r in range(0, t.shape[0], step):
                        offset += w.write(name, offset, t[r:r + step].to(dtype))
                total += offset
                if progress:
                    progress((n + 1) / len(table), name)
        return total
    finally:
        for f in files:
            f.close()


def _copy_tokenizer(ckpt_dir: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (ckpt_dir / name).is_file():
            shutil.copy2(ckpt_dir / name, out / name)
            copied.append(name)
    return copied


def fill_compile_cache(engine_dir: Path, arch_tag: str, tp: int = 1, timeout_s: float = 1800) -> float:
    """Load the engine in a fresh process (one per rank for a tp engine, in its process group) with
    the cache dir pointing into the engine, compile and capture every graph there; returns the
    seconds it took. The ranks of a tp engine compile the same graphs into the one cache."""
    (engine_dir / "compile_cache" / arch_tag).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_ranks(["-m", "service.compiler.engine.engine", "warmup", str(engine_dir)], tp, what="compiling the engine",
              timeout_s=timeout_s)
    return time.perf_counter() - start


def _rank_progress(progress: ProgressFn | None, rank: int | None, tp: int) -> ProgressFn | None:
    """Rank ``rank``'s share of the whole build's progress, its messages labelled "rank N/M <tensor>"."""
    if progress is None or rank is None:
        return progress
    return lambda frac, what: progress((rank + frac) / tp, f"rank {rank}/{tp} {what}")


def build_torch_engine(ckpt_dir: Path, resolved: ResolvedBuild, out_dir: Path, *,
                       progress: ProgressFn | None = None) -> dict:
    """Write the engine directory atomically; returns build stats (also stored in config.json)."""
    start = time.perf_counter()
    cfg = load_config(ckpt_dir)
    bc = resolved.config
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[bc.dtype]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        m = Mapping.from_dict(cfg["mapping"])
        tp = m.tp_size if (bc.keep_tensor_parallel and m.pp_size == 1) else 1
        if bc.keep_tensor_parallel and m.pp_size != 1:
            raise InvalidCheckpoint(f"keep_tensor_parallel needs a pp_size=1 checkpoint, got pp_size={m.pp_size}")
        if tp > 1 and cfg.get("architecture") == DECILM_ARCH:
            raise InvalidCheckpoint("DeciLM engines run as one rank: build without keep_tensor_parallel "
                                    "(a tp checkpoint is merged into one engine)")
        ranks = [None] if tp == 1 else list(range(tp))
        nbytes = sum(write_engine_weights(ckpt_dir, cfg, dtype, tmp / f"rank{r or 0}.safetensors",
                                          _rank_progress(progress, r, tp), r)
                     for r in ranks)
        weights_s = time.perf_counter() - start
        engine_cfg: dict[str, Any] = {
            "version": ENGINE_VERSION,
            "backend": "torch",
            "pretrained_config": {**cfg, "mapping": Mapping(tp_size=tp, moe_ep_size=m.moe_ep if tp > 1 and
                                                            m.has_moe_split else None).to_dict()},
            "build_config": bc.to_dict(),
            "engine": {
                "layout": engine_layout(cfg)[0],
                "tp_size": tp,
                "files": [f"rank{r}.safetensors" for r in range(tp)],
                "arch": resolved.arch_tag,
                "compile_cache": None,
                "tokenizer_files": _copy_tokenizer(ckpt_dir, tmp),
                "torch_version": torch.__version__,
                "memory_estimate": resolved.estimate.to_dict(),
            },
        }
        (tmp / "config.json").write_text(json.dumps(engine_cfg, indent=2) + "\n")
        compile_s = 0.0
        if resolved.target is not None and bc.compile:
            if progress:
                progress(1.0, "compiling the engine")
            compile_s = fill_compile_cache(tmp, resolved.arch_tag, tp)
            engine_cfg["engine"]["compile_cache"] = f"compile_cache/{resolved.arch_tag}"
        stats = {"weights_bytes": nbytes, "weights_seconds": round(weights_s, 3),
                 "compile_seconds": round(compile_s, 3), "build_seconds": round(time.perf_counter() - start, 3)}
        engine_cfg["build_stats"] = stats
        (tmp / "config.json").write_text(json.dumps(engine_cfg, indent=2) + "\n")
        if progress and bc.measure_performance:
            progress(1.0, "timing the engine")
        perf = (measure_in_build(tmp, gpu=resolved.target is not None, tp=tp) if bc.measure_performance
                else not_measured("build_config.measure_performance is false", tp_size=tp))
        (tmp / PERFORMANCE_FILE).write_text(json.dumps({**perf, "build_seconds": stats["build_seconds"]}, indent=2)
                                            + "\n")
        publish_dir(tmp, out_dir)
        return stats
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

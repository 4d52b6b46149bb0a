"""The ``tensorrt`` backend: the onnx backend's graphs -> serialized TensorRT engines.

Written against TensorRT's documented Python API (``trt.Builder``, ``trt.OnnxParser``,
``IBuilderConfig`` flags, optimization profiles, timing cache, ``build_serialized_network``). It is
imported only where ``import tensorrt`` works and a GPU is present (see ``..capabilities``); nothing
here runs, or claims to have run, anywhere else.

    engine/prefill.engine, engine/decode.engine   serialized engines (one optimization profile each)
    engine/timing.cache                           TensorRT's timing cache (reused by later builds)
    engine/onnx/                                  the parsed graphs (the onnx backend's engine)
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from ...checkpoint.validate import load_config
from ...errors import KilnError
from ..config import ResolvedBuild
from .onnx_backend import build_onnx_engine
from .torch_backend import ENGINE_VERSION

PRECISION_FLAGS = {"float16": "FP16", "bfloat16": "BF16", "float32": None}


class TensorRTBuildFailed(KilnError):
    code = "tensorrt_build_failed"


def _profiles(bc, cfg: dict, graph: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes per input, from the BuildConfig limits."""
    L, nkv, d = int(cfg["num_hidden_layers"]), int(cfg["num_key_value_heads"]), int(cfg["head_size"])
    B, T, S = bc.max_batch_size, bc.max_input_len, bc.max_seq_len
    if graph == "prefill":
        return {"input_ids": ((1, 1), (1, min(128, T)), (B, T))}
    kv = ((L, 1, nkv, 1, d), (L, 1, nkv, min(256, S - 1), d), (L, B, nkv, S - 1, d))
    return {"input_ids": ((1, 1), (1, 1), (B, 1)), "past_keys": kv, "past_values": kv}


def _build_one(trt, onnx_path: Path, out: Path, profiles: dict, dtype: str, cache_bytes: bytes | None,
               workspace: int) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external data is read next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildFailed(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    flag = PRECISION_FLAGS[dtype]
    if flag is not None:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_bytes or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildFailed(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log)")
    out.write_bytes(bytes(serialized))
    return bytes(config.get_timing_cache().serialize())


def build_tensorrt_engine(ckpt_dir: Path, resolved: ResolvedBuild, out_dir: Path, *, progress=None) -> dict:
    import tensorrt as trt  # only reached where capabilities() found it importable

    start = time.perf_counter()
    cfg = load_config(ckpt_dir)
    bc = resolved.config
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        build_onnx_engine(ckpt_dir, resolved, tmp / "onnx")
        cache: bytes | None = None
        workspace = max(1 << 30, resolved.estimate.activations_bytes)
        for graph in ("prefill", "decode"):
            cache = _build_one(trt, tmp / "onnx" / f"{graph}.onnx", tmp / f"{graph}.engine",
                               _profiles(bc, cfg, graph), bc.dtype, cache, workspace)
        (tmp / "timing.cache").write_bytes(cache or b"")
        stats = {"build_seconds": round(time.perf_counter() - start, 3)}
        (tmp / "config.json").write_text(json.dumps({
            "version": ENGINE_VERSION, "backend": "tensorrt", "tensorrt_version": trt.__version__,
            "pretrained_config": cfg, "build_config": bc.to_dict(),
            "engine": {"files": ["prefill.engine", "decode.engine", "timing.cache"], "arch": resolved.arch_tag},
            "build_stats": stats,
        }, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        return stats
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

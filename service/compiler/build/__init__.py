"""The build stage: ``build(checkpoint_dir, BuildConfig(...), out_dir)`` -> an engine directory.

    from service.compiler.build import BuildConfig, build
    stats = build("./ckpt", BuildConfig(max_batch_size=8, max_seq_len=2048, target="h100"), "./engine")
    from service.compiler.engine.engine import Engine
    print(Engine.load("./engine").generate([[1, 2, 3]], max_new_tokens=16).tokens)

Every check (backend known and installed here, limits against the model, target GPU present,
memory estimate against the target) runs before any tensor is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..checkpoint.validate import load_config
from ..errors import InvalidArgument, OutputExists
from .capabilities import backend_info, capabilities
from .config import (
    BackendUnavailable,
    BuildConfig,
    EngineDoesNotFit,
    InvalidBuildConfig,
    MemoryEstimate,
    ResolvedBuild,
    TargetUnavailable,
    UnknownBackend,
    validate_build,
)

ProgressFn = Callable[[float, str], None]


def _weight_bytes(ckpt_dir: Path, cfg: dict, dtype: str) -> int | None:
    """Exact parameter bytes in the engine dtype from a tp=pp=1 checkpoint's header (else None: the
    config-derived estimate is used, since split checkpoints repeat replicated tensors per rank)."""
    from ..checkpoint.safetensors_io import ITEMSIZE, read_header
    from .config import ENGINE_DTYPES

    if int(cfg.get("mapping", {}).get("world_size", 1)) != 1 or not (ckpt_dir / "rank0.safetensors").is_file():
        return None
    infos, _ = read_header(ckpt_dir / "rank0.safetensors")
    return sum(info.nbytes // ITEMSIZE[info.dtype] for info in infos.values()) * ENGINE_DTYPES[dtype]


def plan_build(checkpoint_dir: str | os.PathLike, config: BuildConfig) -> ResolvedBuild:
    """Every check ``build`` makes before writing (no tensor data is read)."""
    ckpt_dir = Path(checkpoint_dir)
    cfg = load_config(ckpt_dir)
    if config.backend not in ("torch", "onnx", "tensorrt", "trtllm"):
        raise UnknownBackend(f"unknown backend {config.backend!r}")
    info = backend_info(config.backend)
    if not info.available:
        raise BackendUnavailable(f"backend {config.backend!r} is not available on this machine: {info.reason}")
    dtype = cfg["dtype"] if config.dtype == "auto" else config.dtype
    wbytes = _weight_bytes(ckpt_dir, cfg, dtype) if dtype in ("float32", "float16", "bfloat16") else None
    return validate_build(config, cfg, weight_bytes=wbytes)


def build(checkpoint_dir: str | os.PathLike, config: BuildConfig, out_dir: str | os.PathLike, *,
          overwrite: bool = False, progress: ProgressFn | None = None) -> dict:
    """Build an engine; returns build stats (seconds, bytes), also stored in the engine's config.json."""
    ckpt_dir, out = Path(checkpoint_dir), Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputExists(f"engine directory already exists: {out}")
    if not out.parent.is_dir():
        raise InvalidArgument(f"parent directory of the engine does not exist: {out.parent}")
    resolved = plan_build(ckpt_dir, config)
    if config.backend == "torch":
        from .backends.torch_backend import build_torch_engine

        return build_torch_engine(ckpt_dir, resolved, out, progress=progress)
    if config.backend == "onnx":
        from .backends.onnx_backend import build_onnx_engine

        return build_onnx_engine(ckpt_dir, resolved, out, progress=progress)
    if config.backend == "tensorrt":
        from .backends.tensorrt_backend import build_tensorrt_engine

        return build_tensorrt_engine(ckpt_dir, resolved, out, progress=progress)
    from .backends.trtllm_backend import build_trtllm_engine

    return build_trtllm_engine(ckpt_dir, resolved, out, progress=progress)


__all__ = [
    "BackendUnavailable",
    "BuildConfig",
    "EngineDoesNotFit",
    "InvalidBuildConfig",
    "MemoryEstimate",
    "ResolvedBuild",
    "TargetUnavailable",
    "UnknownBackend",
    "build",
    "capabilities",
    "plan_build",
]

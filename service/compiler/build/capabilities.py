"""What this machine can build: GPUs (name, SM, memory) and the backends that really import here.

A backend is advertised only when its package imports (and, for TensorRT / TensorRT-LLM, a GPU is
present); nothing is ever reported as available because it might be. Workers call
``capabilities()`` at start and listen on ``build.<arch>`` queues for the archs listed.

    python -m service.compiler.build.capabilities      # prints the JSON
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch

from .config import machine_gpu_targets


@dataclass
class BackendInfo:
    name: str
    available: bool
    version: str | None = None
    reason: str | None = None  # why not, when unavailable


@dataclass
class Capabilities:
    gpus: list[dict] = field(default_factory=list)
    backends: list[BackendInfo] = field(default_factory=list)
    torch_version: str = torch.__version__
    cuda_version: str | None = torch.version.cuda

    @property
    def available_backends(self) -> list[str]:
        return [b.name for b in self.backends if b.available]

    @property
    def build_queues(self) -> list[str]:
        archs = sorted({f"sm{g['sm']}" for g in self.gpus})
        return [f"build.{a}" for a in archs] + ["build.cpu"]

    def to_dict(self) -> dict:
        return {
            "gpus": self.gpus,
            "backends": [asdict(b) for b in self.backends],
            "available_backends": self.available_backends,
            "build_queues": self.build_queues,
            "torch_version": self.torch_version,
            "cuda_version": self.cuda_version,
        }


def _try_import(module: str) -> tuple[str | None, str | None]:
    """(version, None) when ``module`` imports, else (None, the reason)."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return None, f"`import {module}` failed: {type(exc).__name__}: {exc}".strip()
    return str(getattr(mod, "__version__", "unknown")), None


# Backends Kiln has a builder for. The others are detected (their packages' import is reported) but
# never advertised as available until their builder exists.
IMPLEMENTED = ("torch", "onnx", "tensorrt", "trtllm")


def backend_info(name: str) -> BackendInfo:
    info = _package_info(name)
    if info.available and name not in IMPLEMENTED:
        return BackendInfo(name, False, info.version,
                           reason=f"its packages import here, but Kiln's {name} builder is not implemented yet")
    return info


def _package_info(name: str) -> BackendInfo:
    gpus = machine_gpu_targets()
    if name == "torch":
        return BackendInfo("torch", True, torch.__version__)
    if name == "onnx":
        for module in ("onnx", "onnxruntime"):
            version, why = _try_import(module)
            if why:
                return BackendInfo("onnx", False, reason=why)
        return BackendInfo("onnx", True, _try_import("onnx")[0])
    if name in ("tensorrt", "trtllm"):
        module = "tensorrt" if name == "tensorrt" else "tensorrt_llm"
        version, why = _try_import(module)
        if why:
            return BackendInfo(name, False, reason=why)
        if not gpus:
            return BackendInfo(name, False, version, reason=f"{module} {version} imports but no CUDA GPU is present")
        if name == "tensorrt":
            _, why = _try_import("onnx")  # the tensorrt backend parses the onnx backend's graphs
            if why:
                return BackendInfo(name, False, version, reason=why)
        return BackendInfo(name, True, version)
    return BackendInfo(name, False, reason="unknown backend")


@lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    gpus = [{"name": g.name, "sm": g.sm, "memory_bytes": g.memory_bytes} for g in machine_gpu_targets()]
    return Capabilities(gpus=gpus, backends=[backend_info(n) for n in ("torch", "onnx", "tensorrt", "trtllm")])


if __name__ == "__main__":
    print(json.dumps(capabilities().to_dict(), indent=2))

"""Layering: service/compiler imports with only torch, safetensors and numpy (the GPU machine runs it
from the source tree), and never reaches into the service layers."""

from __future__ import annotations

import subprocess
import sys

BLOCKED = ["transformers", "fastapi", "celery", "sqlalchemy", "grpc", "redis", "pydantic", "huggingface_hub",
           "onnx", "onnxruntime", "gguf", "accelerate"]
MODULES = ["service.compiler", "service.compiler.cli", "service.compiler.engine", "service.compiler.reference", "service.compiler.engine.engine",
           "service.compiler.build",
           "service.compiler.quantization", "service.compiler.checkpoint.pipeline_split", "service.compiler.sources.hub"]

CODE = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # importing it now raises ImportError
import importlib
for m in {MODULES!r}:
    importlib.import_module(m)
bad = sorted(k for k in sys.modules if k.startswith(("service.api", "service.workers", "service.store", "service.domain")))
assert not bad, bad
print("ok")
"""


def test_compiler_imports_without_optional_packages_or_service_layers():
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]

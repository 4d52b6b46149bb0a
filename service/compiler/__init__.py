"""Kiln's compiler library: HF checkpoint -> TensorRT-LLM checkpoint (-> quantized -> engine -> report).

Pure library: imports nothing from service.api / service.workers; needs only torch, safetensors and
numpy (transformers only for comparisons). Shaped like TensorRT-LLM's conversion API:

    from service.compiler import from_hugging_face, from_checkpoint, validate_checkpoint, Mapping
    model = from_hugging_face("./SmolLM2-135M", dtype="bfloat16", mapping=Mapping(tp_size=3))
    model.save_checkpoint("./ckpt")
    assert validate_checkpoint("./ckpt").ok
"""

from .checkpoint.mapping import Mapping
from .checkpoint.validate import (
    CheckpointModel,
    ValidationReport,
    expected_tensors,
    from_checkpoint,
    validate_checkpoint,
)
from .convert import ConvertSummary, convert_checkpoint, from_hugging_face, preflight
from .models import supported_hf_architectures
from .version import __version__

__all__ = [
    "CheckpointModel",
    "ConvertSummary",
    "Mapping",
    "ValidationReport",
    "__version__",
    "convert_checkpoint",
    "expected_tensors",
    "from_checkpoint",
    "from_hugging_face",
    "preflight",
    "supported_hf_architectures",
    "validate_checkpoint",
]

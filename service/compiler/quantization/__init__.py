"""Kiln's quantizer: FP8, INT8/INT4 weight-only, INT4 AWQ, INT8 SmoothQuant, INT8/FP8 KV cache, in the
TensorRT-LLM quantized checkpoint format (see ``layout.py``), calibrated layer by layer (GPU when present).

    from service.compiler.quantization import QuantConfig, CalibrationSettings, quantize_checkpoint
    quantize_checkpoint(hf_dir, out_dir, QuantConfig("FP8", kv_cache_quant_algo="FP8"),
                        calibration=CalibrationSettings(samples=64, seq_len=512))
    accuracy_report(out_dir, reference=hf_dir, tokenizer_dir=hf_dir).passed

Modules: config (QuantConfig, checks), layout (tensor names/shapes/dtypes), fp8 / weight_only / awq /
smoothquant / kv_cache (the algorithms), calibration (data, layer streaming), decoder (one layer on
checkpoint tensors), quantize (the stage), qlinear (execute quantized linears: the runtimes' hook),
report (accuracy vs the unquantized model), modelopt_import (ModelOpt HF exports).
"""

from .calibration import CalibrationSettings
from .config import QuantConfig
from .modelopt_import import import_modelopt_export
from .qlinear import dequantize_weight, qdq_kv_cache, qlinear
from .quantize import QuantizeSummary, quantize_checkpoint
from .report import AccuracyReport, Thresholds, accuracy_report

__all__ = ["AccuracyReport", "CalibrationSettings", "QuantConfig", "QuantizeSummary", "Thresholds", "accuracy_report",
           "dequantize_weight", "import_modelopt_export", "qdq_kv_cache", "qlinear", "quantize_checkpoint"]

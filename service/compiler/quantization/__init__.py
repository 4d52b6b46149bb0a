"""Kiln's quantizer: FP8, INT8/INT4 weight-only, INT4 AWQ, INT8 SmoothQuant, INT8/FP8 KV cache, in the
TensorRT-LLM quantized checkpoint format (see ``layout.py``), calibrated layer by layer.

    from service.compiler.quantization import QuantConfig, CalibrationSettings, quantize_checkpoint
    quantize_checkpoint(hf_dir, out_dir, QuantConfig("FP8", kv_cache_quant_algo="FP8"),
                        calibration=CalibrationSettings(samples=64, seq_len=512))
"""

from .calibration import CalibrationSettings
from .config import QuantConfig
from .qlinear import dequantize_weight, qdq_kv_cache, qlinear
from .quantize import QuantizeSummary, quantize_checkpoint

__all__ = ["CalibrationSettings", "QuantConfig", "QuantizeSummary", "dequantize_weight", "qdq_kv_cache", "qlinear",
           "quantize_checkpoint"]

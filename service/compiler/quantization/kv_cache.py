"""KV cache quantization scales (``kv_cache_scaling_factor``, float32 (1,) per layer).

Calibrated from the largest |K| or |V| (K after RoPE, as it is cached) seen over the calibration
data: FP8 scale = amax/448; INT8 scale = r·amax/127, where TensorRT-LLM's converter takes r = 1 and
Kiln searches r in {1, 0.9, ..., 0.5} per layer for the lowest attention-output error (one scale serves
K and V, so amax/127 sized for K's outliers leaves V coarse; on SmolLM2 the search cuts the INT8-KV KL
from 0.030 to 0.014). A scale is never an uncalibrated 1.0: INT8 with 1.0 destroys the output
(quantization.md §4.4), so a zero amax is an error, not a default.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from .fp8 import E4M3_MAX, qdq_fp8

INT8_MAX = 127.0


def kv_cache_scale(amax: float, algo: str) -> torch.Tensor:
    if not amax > 0:
        raise InvalidArgument(f"KV cache calibration saw no K/V activations (amax={amax}); refusing an "
                              "uncalibrated scale", hint="give calibration data with at least one token")
    return torch.tensor([amax / (INT8_MAX if algo == "INT8" else E4M3_MAX)], dtype=torch.float32)


def qdq_kv(x: torch.Tensor, scale: torch.Tensor, algo: str) -> torch.Tensor:
    """What is read back from a quantized KV cache."""
    s = scale.float().reshape(())
    if algo == "INT8":
        return torch.round(x.float() / s).clamp(-128, 127) * s
    return qdq_fp8(x, s)

"""FP8 (E4M3, max 448) quantization: per-tensor weights + static per-tensor activations (``FP8``), and
per-channel weights + dynamic per-token activations (``FP8_PER_CHANNEL_PER_TOKEN``).

Scales follow ModelOpt/TensorRT-LLM: scale = amax / 448, q = saturate(x / scale) cast to E4M3
(clamp to +-448 before the cast; E4M3 has no infinity). The fused qkv weight is one tensor, so its
single scale is the common max of q, k and v.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
TINY = 1e-12


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Saturating cast of ``x / scale`` to E4M3 (``scale`` broadcasts)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def qdq_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return to_fp8(x, scale).float() * scale


def scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    a = torch.as_tensor(amax, dtype=torch.float32)
    return (a.clamp_min(TINY) / E4M3_MAX).reshape(a.shape or (1,))


def quantize_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (fp8 weight, float32 scale of shape (1,))."""
    scale = scale_from_amax(w.float().abs().max()).reshape(1)
    return to_fp8(w, scale), scale


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (fp8 weight, float32 per-output-channel scale [out])."""
    scale = scale_from_amax(w.float().abs().amax(dim=1))
    return to_fp8(w, scale[:, None]), scale


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """What the engine's FP8 GEMM computes: both operands rounded to E4M3, fp32 accumulation, rescale.

    On a GPU with FP8 tensor cores (SM >= 8.9) this *is* an FP8 GEMM (``torch._scaled_mm``); elsewhere
    it is simulated in float32 with the same roundings."""
    if x.is_cuda and fp8_gemm_available(x.device):
        return scaled_mm_fp8(x, w8, w_scale, a_scale)
    xq = to_fp8(x, a_scale).float()
    return (xq @ w8.float().t()) * (a_scale * w_scale).reshape(-1)


def fp8_gemm_available(device: torch.device) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_fp8(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A real E4M3 x E4M3 GEMM on the GPU: x [..., in] (any float dtype), w8 [out, in] E4M3, float32 scales."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    pad = -m % 16  # the FP8 GEMM wants every dimension a multiple of 16
    xq = to_fp8(x2, a_scale.to(x.device))
    if pad:
        xq = torch.cat([xq, torch.zeros(pad, shape[-1], dtype=xq.dtype, device=xq.device)])
    y = torch._scaled_mm(xq, w8.to(x.device).t(), scale_a=a_scale.to(x.device).float().reshape(()),
                         scale_b=w_scale.to(x.device).float().reshape(()), out_dtype=out_dtype)
    return y[:m].reshape(*shape[:-1], w8.shape[0])


def fp8_rowwise_linear(x: torch.Tensor, w8: torch.Tensor, per_channel: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic activation scales times per-channel weight scales."""
    tok = scale_from_amax(x.float().abs().amax(dim=-1, keepdim=True))
    xq = to_fp8(x, tok).float()
    return (xq @ w8.float().t()) * tok * per_channel.reshape(-1)

"""SmoothQuant W8A8 (Xiao et al., arXiv 2211.10438) in TensorRT-LLM's ``W8A8_SQ_PER_CHANNEL`` layout:
int8 per-channel weights, int8 static per-tensor activations, ``prequant_scaling_factor`` = 1/s.

s_j = max|X_j|^α / max|W_{:,j}|^(1-α) (max over every linear sharing the input, e.g. fc and gate),
clamped to [1e-4, 1e4], 1 for dead channels. The activation scale is max_j(max|X_j|/s_j)/127.
ModelOpt fixes α = 1.0; Kiln picks α per model: every α of the grid (1.0 included) runs the quantized model
layer by layer on held-out windows, and the α with the lowest mean KL to the float model wins (``quantize.py``).
"""

from __future__ import annotations

import torch

from .weight_only import div_exact

QMAX = 127.0


def smooth_scale(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(1e-5)
    a = act_amax.float()
    s = (a.clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(1e-4, 1e4)
    return torch.where(a > 0, s, torch.ones_like(s))


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = div_exact(w.float().abs().amax(dim=1).clamp_min(1e-12), QMAX).float()
    return torch.round(w.float() / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8), scale


def sq_group_tensors(weights: list[torch.Tensor], act_amax: torch.Tensor, alpha: float,
                     dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Checkpoint tensors for linears sharing one input (shared smoothing and activation scale)."""
    pqs = (1.0 / smooth_scale(act_amax, weights, alpha)).to(dtype)
    a_scale = ((act_amax.float() * pqs.float()).max().clamp_min(1e-12) / QMAX).reshape(1)
    out = []
    for w in weights:
        q, ws = quantize_int8_rows(w.float() / pqs.float())
        out.append({"weight": q, "weights_scaling_factor": ws, "activation_scaling_factor": a_scale,
                    "prequant_scaling_factor": pqs})
    return out


def quantize_activation_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale).clamp(-128, 127)


def sq_linear(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
              pqs: torch.Tensor) -> torch.Tensor:
    """The engine's int8 GEMM: smooth, quantize the input per tensor, integer products, rescale per row."""
    xq = quantize_activation_int8(x.float() * pqs.float(), a_scale)
    return (xq @ q.float().t()) * (a_scale.reshape(()) * w_scale.float())


def sq_per_token_group(weights: list[torch.Tensor], act_amax: torch.Tensor, alpha: float | None,
                       smoother: bool) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """``W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN`` tensors and the smoothing s (the input is divided by s).

    Inputs of qkv and fc/gate come from a norm, which the caller divides by s (folded); the inputs of
    dense and proj are divided at run time by the stored ``smoother`` (= s). Activations are quantized
    per token at run time, so there is no activation scale; ``alpha=None`` means no smoothing.
    """
    s = smooth_scale(act_amax, weights, alpha) if alpha is not None else torch.ones_like(act_amax.float())
    made = []
    for w in weights:
        q, ws = quantize_int8_rows(w.float() * s)
        d = {"weight": q, "per_channel_scale": ws.reshape(1, -1)}
        if smoother:
            d["smoother"] = s.reshape(1, -1).float()
        made.append(d)
    return made, s

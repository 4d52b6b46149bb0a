"""Weight-only integer quantization (``W8A16``, ``W4A16`` per output channel) and int4 packing.

Symmetric scales as in ModelOpt/TensorRT-LLM: scale = amax / 127 (int8) or amax / 7 (int4), q =
clamp(round(w / scale), -128..127 or -8..7). Scales are rounded to the model dtype *before* the
weights are divided by them, so what is stored dequantizes exactly as it was quantized.

int4 packing, two values per int8:
* ``pack_int4_rows`` ([out, in] -> [out/2, in]): byte [j, i] holds row 2j in the low nibble and row
  2j+1 in the high nibble (ModelOpt's AWQ export, TensorRT-LLM ``W4A16_AWQ``);
* ``pack_int4_cols`` ([in, out] -> [in, out/2]): the same pairing along the last axis (``W4A16``);
  ``pack_int4_cols(q.t()) == pack_int4_rows(q).t()``.
"""

from __future__ import annotations

import torch

QMAX = {8: 127, 4: 7}
QMIN = {8: -128, 4: -8}
TINY = 1e-12


def div_exact(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c``, correctly rounded on every device. With a Python number CUDA multiplies by the float32
    reciprocal (one ulp off the CPU's division for some x), so a checkpoint quantized on the GPU
    would differ from the CPU's; dividing by a tensor on x's device is a true division on both."""
    return x / torch.tensor(c, dtype=x.dtype, device=x.device)


def symmetric_scale(amax: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """amax / qmax rounded to the storage dtype (and back to float32 for the division)."""
    return div_exact(amax.float().clamp_min(TINY), QMAX[bits]).to(dtype).float().clamp_min(TINY)


def quantize_symmetric(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round(w.float() / scale).clamp(QMIN[bits], QMAX[bits]).to(torch.int8)


def quantize_per_channel(w: torch.Tensor, bits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (int8 q [out, in] with values in the int``bits`` range, scale [out] in ``dtype``)."""
    scale = symmetric_scale(w.float().abs().amax(dim=1), bits, dtype)
    return quantize_symmetric(w, scale[:, None], bits), scale.to(dtype)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """[out, in] int8 in [-8, 7] -> [out/2, in] int8; even row in the low nibble."""
    if q.shape[0] % 2:
        raise ValueError(f"cannot pack {q.shape[0]} rows two per byte")
    lo, hi = q[0::2].to(torch.int16), q[1::2].to(torch.int16)
    byte = (lo & 0x0F) | ((hi & 0x0F) << 4)
    return byte.to(torch.uint8).view(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4_rows``: [out/2, in] int8 -> [out, in] int8 in [-8, 7]."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = b & 0x0F, (b >> 4) & 0x0F
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.empty((packed.shape[0] * 2, *packed.shape[1:]), dtype=torch.int8, device=packed.device)
    out[0::2], out[1::2] = lo.to(torch.int8), hi.to(torch.int8)
    return out


def pack_int4_cols(q: torch.Tensor) -> torch.Tensor:
    """[in, out] int8 in [-8, 7] -> [in, out/2]; even column in the low nibble."""
    return pack_int4_rows(q.t().contiguous()).t().contiguous()


def unpack_int4_cols(packed: torch.Tensor) -> torch.Tensor:
    return unpack_int4_rows(packed.t().contiguous()).t().contiguous()


def quantize_weight_only(w: torch.Tensor, bits: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """[out, in] float -> checkpoint tensors {weight [in, out] or [in, out/2], per_channel_scale [out]}."""
    q, scale = quantize_per_channel(w, bits, dtype)
    # pack_int4_cols(q.t()) is pack_int4_rows(q).t(): pack first, then one transposing copy of half the bytes
    return {"weight": (q if bits == 8 else pack_int4_rows(q)).t().contiguous(), "per_channel_scale": scale}


def dequantize_weight_only(weight: torch.Tensor, per_channel_scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Checkpoint tensors -> float32 [out, in]."""
    q = weight if bits == 8 else unpack_int4_cols(weight)
    return q.t().float() * per_channel_scale.float()[:, None]


# --- group-wise int4 (AWQ / RTN g128) --------------------------------------------------------


def quantize_groupwise(w: torch.Tensor, group: int, dtype: torch.dtype, *, zero_point: bool = False,
                       clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[out, in] -> (q int8 [out, in] in [-8, 7], scale [out, in/g] dtype, additive zero [out, in/g] dtype | None).

    Dequantized: w = q * scale (+ zero). ``clip`` [out, in/g] bounds |w| per group (AWQ clip search).
    Symmetric: scale = amax / 7. Zero point (the original AWQ): scale = (max - min) / 15,
    z = clamp(-round(min / scale), 0, 15), stored as the signed nibble q_u - 8 and zero = (8 - z) * scale.
    """
    out, inp = w.shape
    wg = w.float().reshape(out, inp // group, group)
    if clip is not None:
        c = clip.float()[..., None]
        wg = torch.maximum(torch.minimum(wg, c), -c)
    if not zero_point:
        scale = symmetric_scale(wg.abs().amax(dim=-1), 4, dtype)
        q = torch.round(wg / scale[..., None]).clamp(-8, 7)
        return q.reshape(out, inp).to(torch.int8), scale.to(dtype), None
    mx, mn = wg.amax(dim=-1), wg.amin(dim=-1)
    scale = div_exact((mx - mn).clamp_min(TINY), 15).to(dtype).float().clamp_min(TINY)
    z = torch.round(-mn / scale).clamp(0, 15)
    zero = ((8 - z) * scale).to(dtype)
    qu = (torch.round(wg / scale[..., None]) + z[..., None]).clamp(0, 15)
    return (qu - 8).reshape(out, inp).to(torch.int8), scale.to(dtype), zero


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    out, inp = q.shape
    w = q.float().reshape(out, inp // group, group) * scale.float()[..., None]
    if zero is not None:
        w = w + zero.float()[..., None]
    return w.reshape(out, inp)


def qdq_groupwise(w: torch.Tensor, group: int, dtype: torch.dtype, *, zero_point: bool = False,
                  clip: torch.Tensor | None = None) -> torch.Tensor:
    q, s, z = quantize_groupwise(w, group, dtype, zero_point=zero_point, clip=clip)
    return dequantize_groupwise(q, s, z, group)

"""AWQ (Lin et al., arXiv 2306.00978) for ``W4A16_AWQ``: activation-aware scale search, then the
original per-group clip search (ModelOpt's default ``awq_lite`` skips the clip), group 128,
symmetric or with a zero point.

For the linears that share one input (fused qkv; fc + gate):
1. x̄_j = mean |x_j| over every calibration token; for r in {0, 1/n, ..., (n-1)/n}: s = x̄^r / sqrt(max·min);
   loss = MSE between x·Wᵀ and (x/s)·Q(W·diag(s))ᵀ on a token sample; keep the best s (r = 0 is plain RTN,
   so the search never loses to it on its own loss).
2. Clip search on W·diag(s) with inputs x/s: per output row and group, bound |w| by amax·(1 - i/20),
   i = 0..9, and keep the bound with the lowest output error of that group.
The checkpoint stores ``prequant_scaling_factor`` = 1/s (the engine multiplies the input by it) and the
group-quantized W·diag(s). 1/s is rounded to the model dtype first, and s recomputed from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .weight_only import pack_int4_rows, qdq_groupwise, quantize_groupwise

CLIP_STEPS = 10  # max_shrink 0.5 in steps of 1/20, as llm-awq
OC_BATCH = 256


@dataclass
class AWQResult:
    pre_quant_scale: torch.Tensor  # [in], model dtype: the input is multiplied by it
    clips: list[torch.Tensor | None]  # per weight, [out, in/g] bounds on |W·s| (None: no clip)
    ratio: float
    loss: float
    rtn_loss: float


def _outputs(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x @ w.t() for w in weights]


def search_scale(weights: list[torch.Tensor], x: torch.Tensor, x_mean: torch.Tensor, group: int,
                 dtype: torch.dtype, *, zero_point: bool, n_grid: int = 20) -> tuple[torch.Tensor, float, float, float]:
    """Best pre_quant_scale (model dtype) for linears sharing input ``x`` [T, in]; returns (pqs, ratio, loss, rtn_loss)."""
    x = x.float()
    ws = [w.float() for w in weights]
    ref = _outputs(x, ws)
    denom = sum(float(r.pow(2).sum()) for r in ref) or 1.0
    xm = x_mean.float().clamp_min(1e-8)
    best = (float("inf"), 0.0, torch.ones_like(xm).to(dtype))
    rtn_loss = float("nan")
    for i in range(n_grid):
        r = i / n_grid
        s = xm.pow(r).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        pqs = (1.0 / s).to(dtype)
        s_eff = 1.0 / pqs.float()
        xs = x * pqs.float()
        loss = sum(float((xs @ qdq_groupwise(w * s_eff, group, dtype, zero_point=zero_point).t() - o).pow(2).sum())
                   for w, o in zip(ws, ref, strict=False)) / denom
        if i == 0:
            rtn_loss = loss
        if loss < best[0]:
            best = (loss, r, pqs)
    return best[2], best[1], best[0], rtn_loss


def search_clip(w: torch.Tensor, x: torch.Tensor, group: int, dtype: torch.dtype, *, zero_point: bool) -> torch.Tensor:
    """Per (output row, group) bound on |w| minimising that group's output error; w [out, in], x [T, in]."""
    out, inp = w.shape
    ng = inp // group
    xg = x.float().reshape(-1, ng, group)  # [T, ng, g]
    best_clip = torch.empty(out, ng, device=w.device)
    for o0 in range(0, out, OC_BATCH):
        wb = w[o0:o0 + OC_BATCH].float()
        wg = wb.reshape(-1, ng, group)
        org_max = wg.abs().amax(dim=-1)  # [oc, ng]
        ref = torch.einsum("tgk,ogk->otg", xg, wg)
        best_err = torch.full_like(org_max, float("inf"))
        best = org_max.clone()
        for i in range(CLIP_STEPS):
            m = org_max * (1 - i / 20)
            q = qdq_groupwise(wb, group, dtype, zero_point=zero_point, clip=m).reshape(-1, ng, group)
            err = (torch.einsum("tgk,ogk->otg", xg, q) - ref).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, m, best)
        best_clip[o0:o0 + OC_BATCH] = best
    return best_clip


def awq_search(weights: list[torch.Tensor], x: torch.Tensor, x_mean: torch.Tensor, group: int, dtype: torch.dtype,
               *, zero_point: bool = False, n_grid: int = 20, clip: bool = True) -> AWQResult:
    pqs, ratio, loss, rtn = search_scale(weights, x, x_mean, group, dtype, zero_point=zero_point, n_grid=n_grid)
    s_eff = 1.0 / pqs.float()
    xs = x.float() * pqs.float()
    clips: list[torch.Tensor | None] = [
        search_clip(w.float() * s_eff, xs, group, dtype, zero_point=zero_point) if clip else None for w in weights
    ]
    return AWQResult(pqs, clips, ratio, loss, rtn)


def awq_tensors(w: torch.Tensor, pre_quant_scale: torch.Tensor, clip: torch.Tensor | None, group: int,
                dtype: torch.dtype, *, zero_point: bool) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one linear: weight [out/2, in], weights_scaling_factor, prequant_scaling_factor, zero."""
    ws = w.float() / pre_quant_scale.float()
    q, scale, zero = quantize_groupwise(ws, group, dtype, zero_point=zero_point, clip=clip)
    out = {"weight": pack_int4_rows(q), "weights_scaling_factor": scale,
           "prequant_scaling_factor": pre_quant_scale.to(dtype)}
    if zero is not None:
        out["zero"] = zero
    return out


def rtn_tensors(w: torch.Tensor, group: int, dtype: torch.dtype, *, zero_point: bool = False) -> dict[str, torch.Tensor]:
    """Plain group-wise round-to-nearest in the AWQ layout (pre_quant_scale 1): the baseline AWQ must beat."""
    return awq_tensors(w, torch.ones(w.shape[1], dtype=dtype), None, group, dtype, zero_point=zero_point)

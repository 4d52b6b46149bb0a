"""Metrics over logits: perplexity, logit error, top-1 agreement and KL of one model against another."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token cross entropy) of ``logits`` [N, L, V] on the windows ``ids`` [N, L]."""
    return math.exp(float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))


def logit_metrics(candidate: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """The candidate's logits against the reference's on the same positions (any shape [..., V]):
    max / mean absolute error, the share of positions whose argmax tokens agree, and the mean
    KL(P_reference || P_candidate)."""
    cand, ref = candidate.float(), reference.float()
    diff = (cand - ref).abs()
    lpr, lpc = F.log_softmax(ref, -1), F.log_softmax(cand, -1)
    return {"max_abs_logit_error": float(diff.max()), "mean_abs_logit_error": float(diff.mean()),
            "top1_agreement": float((cand.argmax(-1) == ref.argmax(-1)).float().mean()),
            "kl_divergence": float((lpr.exp() * (lpr - lpc)).sum(-1).mean())}


__all__ = ["logit_metrics", "perplexity"]

"""The two comparisons an evaluation makes, each on the same held-out windows and prompts:

* ``checkpoint_vs_unquantized``: a (quantized) checkpoint against the unquantized model, both
  executed from their stored tensors (``quantization.report.compare``: perplexity, top-1 agreement,
  KL, thresholds), plus ROUGE-1/L of their greedy continuations, generated with a KV cache by the
  reference runtime (which executes quantized checkpoints from their low-precision tensors).
* ``engine_vs_reference``: an engine against the reference runtime (the numerical oracle) on the
  checkpoint it was built from: logit error, top-1 agreement, KL, perplexity, greedy identity,
  ROUGE-1/2/L, load / TTFT / decode timings.

The engine and the reference runtime are imported inside the functions, so this package imports
with torch alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .metrics import logit_metrics, perplexity
from .rouge import mean_rouge

Progress = Callable[[float, str], None]


def _quiet(fraction: float, message: str) -> None:
    pass


def greedy_rouge(candidate_ckpt: Path, reference_ckpt: Path, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Mean ROUGE of the candidate checkpoint's greedy continuations against the reference's."""
    from ..reference import ReferenceModel

    cand, ref = ReferenceModel.from_checkpoint(candidate_ckpt), ReferenceModel.from_checkpoint(reference_ckpt)
    return mean_rouge([cand.generate(p, max_new_tokens) for p in prompts],
                      [ref.generate(p, max_new_tokens) for p in prompts])


def checkpoint_vs_unquantized(ckpt_dir: Path, unquantized_dir: Path, windows: torch.Tensor, prompts: list[list[int]],
                              max_new_tokens: int, thresholds: dict | None, progress: Progress = _quiet) -> dict:
    """``quantization.report.compare`` of the checkpoint against the unquantized one; ROUGE from
    ``greedy_rouge`` (the quantizer's runner would re-run the whole prefix per token)."""
    from ..quantization.report import CheckpointRunner, Thresholds, compare

    th = Thresholds(**(thresholds or {}))
    rep = compare(CheckpointRunner.from_dir(ckpt_dir), CheckpointRunner.from_dir(unquantized_dir), windows,
                  None, max_new_tokens, th)
    if prompts:
        progress(0.25, "greedy continuations of the quantized and the unquantized model")
        r = greedy_rouge(ckpt_dir, unquantized_dir, prompts, max_new_tokens)
        rep.rouge1, rep.rouge_l = r["rouge1"], r["rouge_l"]
        if rep.rouge_l < th.min_rouge_l:
            rep.failures.append(f"ROUGE-L {rep.rouge_l:.3f} < {th.min_rouge_l}")
    return rep.to_dict()


def engine_vs_reference(engine_dir: Path, ckpt_dir: Path, windows: torch.Tensor, prompts: list[list[int]],
                        max_new_tokens: int, progress: Progress = _quiet) -> dict:
    """The engine against the reference runtime on the checkpoint it came from."""
    from ..engine.engine import Engine
    from ..reference import ReferenceModel

    t0 = time.perf_counter()
    engine = Engine.load(engine_dir)
    load_s = time.perf_counter() - t0
    ref = ReferenceModel.from_checkpoint(ckpt_dir)
    progress(0.55, "engine vs reference: logits")
    w = windows[:, : min(windows.shape[1], engine.max_seq)]
    le, lr = [], []
    for b0 in range(0, w.shape[0], engine.max_batch):
        chunk = w[b0:b0 + engine.max_batch]
        le.append(engine.forward(chunk).float())
        lr.append(ref.forward(chunk).float())
    logits_e, logits_r = torch.cat(le), torch.cat(lr)
    progress(0.75, "engine vs reference: greedy generations")
    gen = engine.generate(prompts, max_new_tokens=max_new_tokens)
    ref_gen = [ref.generate(p, max_new_tokens) for p in prompts]
    rouge = mean_rouge(gen.tokens, ref_gen)
    return {
        "windows": [int(w.shape[0]), int(w.shape[1])],
        **logit_metrics(logits_e, logits_r),
        "perplexity": perplexity(logits_e, w), "perplexity_reference": perplexity(logits_r, w),
        "greedy_identical": sum(a == b for a, b in zip(gen.tokens, ref_gen, strict=True)) / max(len(prompts), 1),
        **rouge,
        "prompts": len(prompts), "max_new_tokens": max_new_tokens,
        "performance": {"load_seconds": round(load_s, 3), **engine.load_stats,
                        "ttft_seconds": gen.stats.get("ttft_seconds"),
                        "decode_tokens_per_second": gen.stats.get("decode_tokens_per_second"),
                        "batch": len(prompts), "build": engine.config.get("build_stats")},
        "device": str(engine.device),
    }


__all__ = ["checkpoint_vs_unquantized", "engine_vs_reference", "greedy_rouge"]

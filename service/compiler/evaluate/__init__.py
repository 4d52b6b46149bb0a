"""The evaluate stage: an engine against the reference runtime on a bundled prompt set.

    from service.compiler.evaluate import EvalConfig, evaluate
    report = evaluate("./engine", "./ckpt", "./report", EvalConfig(rouge1_threshold=0.95))
    report["passed"], report["metrics"]                 # also report.json + report.html in ./report

Metrics: max absolute logit error and top-1 agreement over every prompt position, greedy-generation
identity and ROUGE-1/2/L (F1) of engine generations against reference generations (summarize.py's
check, with a settable ROUGE-1 threshold), and perplexity of both on held-out English text (Python's
``pydoc_data.topics``, present on every machine). Prompts come from the same text: tokenized when the
engine ships a tokenizer, else as deterministic byte-level token ids (both models see the same ids).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .report_html import render_html
from .rouge import rouge_l, rouge_n


@dataclass(frozen=True)
class EvalConfig:
    num_prompts: int = 8
    prompt_tokens: int = 24
    max_new_tokens: int = 16
    rouge1_threshold: float = 0.9  # engine vs reference generations, ROUGE-1 F1 (summarize.py's check)
    top1_threshold: float = 0.95
    perplexity_tokens: int = 512
    perplexity_window: int = 128


def held_out_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _token_ids(text: str, tokenizer, vocab: int) -> list[int]:
    if tokenizer is not None:
        return list(tokenizer.encode(text))
    return [b % vocab for b in text.encode("utf-8")]  # byte-level ids: the same for both models


def evaluate(engine_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
             config: EvalConfig | None = None) -> dict:
    from ..engine.engine import Engine
    from ..reference import ReferenceModel

    cfg = config or EvalConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine.load(engine_dir)
    ref = ReferenceModel.from_checkpoint(checkpoint_dir)
    vocab = engine.model.vocab
    ids = _token_ids(held_out_text(), engine.tokenizer, vocab)
    n_ppl = min(cfg.perplexity_tokens, len(ids) // 2)
    ppl_ids, prompt_src = ids[:n_ppl], ids[n_ppl:]
    plen = min(cfg.prompt_tokens, engine.max_input, engine.max_seq - cfg.max_new_tokens)
    stride = max(plen, (len(prompt_src) - plen) // max(cfg.num_prompts, 1))
    prompts = [prompt_src[i * stride:i * stride + plen] for i in range(cfg.num_prompts)]

    max_err, agree, total = 0.0, 0, 0
    for p in prompts:
        got = engine.forward([p])[0].float()
        exp = ref.forward([p])[0].float()
        max_err = max(max_err, float((got - exp).abs().max()))
        agree += int((got.argmax(-1) == exp.argmax(-1)).sum())
        total += len(p)
    engine_gen = engine.generate(prompts, cfg.max_new_tokens).tokens
    ref_gen = [ref.generate(p, max_new_tokens=cfg.max_new_tokens) for p in prompts]
    units = (lambda t: engine.tokenizer.decode(t).split()) if engine.tokenizer is not None else (lambda t: t)
    r1 = [rouge_n(units(e), units(r), 1) for e, r in zip(engine_gen, ref_gen, strict=True)]
    r2 = [rouge_n(units(e), units(r), 2) for e, r in zip(engine_gen, ref_gen, strict=True)]
    rl = [rouge_l(units(e), units(r)) for e, r in zip(engine_gen, ref_gen, strict=True)]
    window = min(cfg.perplexity_window, engine.max_seq, engine.max_batch * engine.max_seq)
    metrics = {
        "max_abs_logit_error": max_err,
        "top1_agreement": agree / max(total, 1),
        "greedy_identical": sum(e == r for e, r in zip(engine_gen, ref_gen, strict=True)) / len(prompts),
        "rouge1": sum(r1) / len(r1), "rouge2": sum(r2) / len(r2), "rougeL": sum(rl) / len(rl),
        "perplexity_engine": _perplexity(lambda x: engine.forward([x])[0], ppl_ids, window),
        "perplexity_reference": _perplexity(lambda x: ref.forward([x])[0], ppl_ids, window),
    }
    metrics["perplexity_ratio"] = metrics["perplexity_engine"] / metrics["perplexity_reference"]
    checks = {
        f"rouge1 >= {cfg.rouge1_threshold}": metrics["rouge1"] >= cfg.rouge1_threshold,
        f"top1_agreement >= {cfg.top1_threshold}": metrics["top1_agreement"] >= cfg.top1_threshold,
    }
    report = {
        "engine": str(engine_dir), "checkpoint": str(checkpoint_dir), "config": asdict(cfg),
        "text_source": "pydoc_data.topics", "tokenized": engine.tokenizer is not None,
        "metrics": metrics, "checks": checks, "passed": all(checks.values()),
        "per_prompt": [{"prompt": p, "engine": e, "reference": r, "rouge1": a, "rouge2": b, "rougeL": c}
                       for p, e, r, a, b, c in zip(prompts, engine_gen, ref_gen, r1, r2, rl, strict=True)],
        "build": json.loads((Path(engine_dir) / "config.json").read_text()).get("build_stats", {}),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.html").write_text(render_html(report))
    return report


def _perplexity(logits_fn, ids: list[int], window: int) -> float:
    nll, count = 0.0, 0
    for s in range(0, len(ids), window):
        chunk = ids[s:s + window]
        if len(chunk) < 2:
            break
        logits = logits_fn(chunk)[:-1].float()
        nll += float(F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / max(count, 1))


__all__ = ["EvalConfig", "evaluate", "held_out_text", "rouge_l", "rouge_n"]

"""Evaluation: an engine against the reference runtime, a quantized checkpoint against the unquantized
model, or both, on held-out text; ``report.json`` + ``report.html``. The one implementation Kiln has:
the worker's evaluate stage is a call into ``evaluate`` and the quantizer's accuracy report takes its
ROUGE and perplexity from here.

    from service.compiler.evaluate import EvalConfig, evaluate
    report = evaluate("./engine", "./ckpt", EvalConfig(min_rouge1=0.95), "./report")
    report["passed"], report["failures"], report["engine"]["rouge1"]

``evaluate(engine_or_checkpoint, reference, config, out_dir)``:

* an engine folder: the engine against the reference runtime on ``reference``, the checkpoint it was
  built from (section ``engine``: max / mean logit error, top-1 agreement, KL, perplexity of both,
  greedy identity, ROUGE-1/2/L (F1) of the engine's greedy continuations against the reference's,
  load / TTFT / decode timings). With ``unquantized=`` (the engine's checkpoint is a quantized one)
  also that checkpoint against the unquantized one (section ``accuracy``, as below).
* a checkpoint folder: it against ``reference``, the unquantized checkpoint (section ``accuracy``:
  ``quantization.report.compare``'s perplexity increase, recovery, top-1 agreement, KL, its thresholds,
  plus ROUGE-1/L of greedy continuations).

Data: ``samples`` held-out windows of ``seq_len`` tokens from the end of the bundled English text
(Python's ``pydoc_data.topics``, never used by calibration), tokenized by the tokenizer in
``data_dir`` (default: the first of the two folders that has one); a model without a tokenizer gets
seeded random token ids of its vocabulary, recorded as such. Prompts are the first ``prompt_tokens``
(at most half a window, at least 2) of the first ``num_prompts`` windows. Gates: the ``accuracy``
thresholds (``quantization.report.Thresholds`` fields, its defaults where unset) and the engine's
``min_rouge1`` / ``min_top1_agreement`` floors; any failure sets ``passed = False`` and is listed
in ``failures``. Progress (fraction, message) goes to ``progress``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidArgument
from .metrics import logit_metrics, perplexity
from .report import json_safe, write_report
from .report_html import render_html
from .rouge import lcs_length, mean_rouge, rouge_l, rouge_n, rouge_scores

METRICS = ("perplexity", "agreement", "kl", "rouge")


@dataclass(frozen=True)
class EvalConfig:
    samples: int = 8  # held-out windows
    seq_len: int = 128  # tokens per window (an engine sees at most its max_seq_len of them)
    num_prompts: int = 4  # greedy-generation prompts (at most ``samples``)
    prompt_tokens: int = 16  # tokens per prompt, at most seq_len // 2, at least 2
    max_new_tokens: int = 16
    metrics: tuple[str, ...] = METRICS  # without "rouge": no generations for ``accuracy``, one prompt for ``engine``
    min_rouge1: float | None = None  # engine vs reference floors; None: not gated
    min_top1_agreement: float | None = None
    thresholds: Mapping | None = None  # quantized vs unquantized: Thresholds fields (its defaults where unset)


def eval_data(data_dir: str | os.PathLike | None, vocab: int, samples: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """Held-out token windows [samples, seq_len] and where they came from: the bundled text's end when
    ``data_dir`` has a tokenizer, else seeded random ids (tiny test models ship no tokenizer)."""
    from ..quantization.calibration import evaluation_windows, load_tokenizer

    if data_dir is not None and load_tokenizer(data_dir) is not None:
        from ..sources.tokenizer import check_token_ids

        windows = evaluation_windows(data_dir, samples, seq_len)
        check_token_ids(windows, vocab, data_dir)
        return windows, "bundled text (held out from calibration)"
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (samples, seq_len), generator=gen), "random token ids (the model has no tokenizer)"


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model"))


def _quiet(fraction: float, message: str) -> None:
    pass


def evaluate(engine_or_checkpoint: str | os.PathLike, reference: str | os.PathLike, config: EvalConfig | None = None,
             out_dir: str | os.PathLike | None = None, *, unquantized: str | os.PathLike | None = None,
             data_dir: str | os.PathLike | None = None, model: str | None = None, meta: Mapping | None = None,
             progress: Callable[[float, str], None] | None = None) -> dict:
    """Measure, gate, and (``out_dir`` given) write ``report.json`` + ``report.html``; returns the
    report (JSON-safe: NaN -> None). ``model`` names the report (default: the evaluated folder);
    ``meta`` adds top-level entries (the worker stage records the job's spec there)."""
    from .measure import checkpoint_vs_unquantized, engine_vs_reference

    cfg = config or EvalConfig()
    progress = progress or _quiet
    target, ref_dir = Path(engine_or_checkpoint), Path(reference)
    is_engine = "engine" in json.loads((target / "config.json").read_text())
    if not is_engine and unquantized is not None:
        raise InvalidArgument("unquantized= goes with an engine; a checkpoint is compared with `reference` itself")
    vocab = int(json.loads((ref_dir / "config.json").read_text())["vocab_size"])
    if data_dir is None:
        data_dir = next((d for d in (target, ref_dir) if _has_tokenizer(d)), None)
    windows, source = eval_data(data_dir, vocab, cfg.samples, cfg.seq_len)
    plen = max(2, min(cfg.prompt_tokens, windows.shape[1] // 2))
    n_prompts = min(cfg.num_prompts, windows.shape[0])
    prompts = [windows[i, :plen].tolist() for i in range(n_prompts)] if "rouge" in cfg.metrics else []
    report: dict = {"model": model or str(target),
                    "data": {"source": source, "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                             "prompt_tokens": plen}, **(meta or {})}
    failures: list[str] = []
    quantized, unquantized_dir = (ref_dir, unquantized) if is_engine else (target, ref_dir)
    if unquantized_dir is not None:
        progress(0.05, "accuracy of the quantized checkpoint vs the unquantized model")
        acc = checkpoint_vs_unquantized(quantized, Path(unquantized_dir), windows, prompts, cfg.max_new_tokens,
                                        dict(cfg.thresholds) if cfg.thresholds is not None else None, progress)
        report["accuracy"] = acc
        failures += [f"accuracy: {f}" for f in acc["failures"]]
    if is_engine:
        progress(0.4, "engine vs reference runtime")
        eng = engine_vs_reference(target, ref_dir, windows, prompts or [windows[0, :plen].tolist()],
                                  cfg.max_new_tokens, progress)
        eng["reference"] = "reference runtime on the " + ("quantized" if unquantized is not None else "converted") + " checkpoint"
        report["engine"] = eng
        if cfg.min_rouge1 is not None and eng["rouge1"] < cfg.min_rouge1:
            failures.append(f"engine: ROUGE-1 {eng['rouge1']:.3f} < {cfg.min_rouge1}")
        if cfg.min_top1_agreement is not None and eng["top1_agreement"] < cfg.min_top1_agreement:
            failures.append(f"engine: top-1 agreement {eng['top1_agreement']:.3f} < {cfg.min_top1_agreement}")
    report["passed"], report["failures"] = not failures, failures
    report = write_report(report, out_dir) if out_dir is not None else json_safe(report)
    progress(1.0, "passed" if not failures else f"{len(failures)} threshold(s) failed")
    return report


__all__ = ["METRICS", "EvalConfig", "eval_data", "evaluate", "json_safe", "lcs_length", "logit_metrics",
           "mean_rouge", "perplexity", "render_html", "rouge_l", "rouge_n", "rouge_scores", "write_report"]

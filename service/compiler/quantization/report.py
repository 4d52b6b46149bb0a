"""Accuracy report of a quantized checkpoint against the unquantized model, measured on the artifact.

The quantized checkpoint is executed from its stored low-precision tensors (``qlinear``), the
reference from the float checkpoint (or the HF folder converted in memory), on held-out windows of
the evaluation text (from the end of the bundled text; calibration reads from its front):

* perplexity of both and the relative increase; % recovery = ppl_ref / ppl_quant x 100;
* top-1 agreement (share of positions whose argmax tokens agree) and mean KL(P_ref || P_quant);
* ROUGE-1 / ROUGE-L F1 of the quantized model's greedy continuations against the reference's
  (``service.compiler.evaluate.rouge``, as are perplexity and the logit metrics: ``evaluate.metrics``);
* the calibration settings and searched hyper-parameters recorded in the checkpoint.

Default thresholds (``Thresholds``) are loose "catch garbage" bounds for small models; a JobSpec sets
its own. A report that fails any threshold has ``passed = False`` and lists why.

    rep = accuracy_report(ckpt_dir, reference=hf_dir, tokenizer_dir=hf_dir)
    print(rep.markdown_row())
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint.safetensors_io import SafetensorsFile
from ..errors import InvalidCheckpoint
from ..evaluate.metrics import logit_metrics, perplexity
from ..evaluate.rouge import mean_rouge
from .calibration import evaluation_windows, stream_layers
from .decoder import Decoder, layer_index, local_name
from .qlinear import layer_kv, layer_linear


@dataclass
class Thresholds:
    max_perplexity_increase_pct: float = 10.0
    min_top1_agreement: float = 0.80
    max_kl_divergence: float = 0.25
    min_rouge_l: float = 0.30


class CheckpointRunner:
    """A whole (world-size-1) checkpoint in memory, executed through ``qlinear``; float or quantized."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]):
        self.config = config
        self.quant = config.get("quantization") or {}
        self.dec = Decoder(config)
        self.globals: dict[str, torch.Tensor] = {}
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            i = layer_index(name)
            if i is None:
                self.globals[name] = t
            else:
                self.layers.setdefault(i, {})[local_name(name)] = t

    @classmethod
    def from_dir(cls, ckpt_dir: str | os.PathLike) -> CheckpointRunner:
        """Any unquantized checkpoint (TP/PP shards merged by the reference runtime's loader), or a
        world-size-1 quantized one."""
        d = Path(ckpt_dir)
        config = json.loads((d / "config.json").read_text())
        world = int((config.get("mapping") or {}).get("world_size", 1))
        if world > 1:
            q = config.get("quantization") or {}
            if q.get("quant_algo") or q.get("kv_cache_quant_algo"):
                raise InvalidCheckpoint(f"{d}: quantized checkpoints are evaluated at world size 1, not {world}")
            from ..reference.checkpoint_loader import load_checkpoint_weights

            return cls(config, load_checkpoint_weights(d)[1])
        with SafetensorsFile(d / "rank0.safetensors") as f:
            tensors = {n: f.tensor(n).clone() for n in f.keys()}
        return cls(config, tensors)

    @classmethod
    def from_hf(cls, model_dir: str | os.PathLike, dtype: str = "float32") -> CheckpointRunner:
        from ..convert import from_hugging_face

        m = from_hugging_face(model_dir, dtype=dtype)
        try:
            return cls(m.config, dict(m.tensors(0)))
        finally:
            m.close()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.dec.embed(self.globals, ids)
        for i in sorted(self.layers):
            t = self.layers[i]
            h = self.dec.layer(t, h, linear=layer_linear(t, self.quant), kv=layer_kv(t, self.quant))
        return self.dec.head(self.globals, h)

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        out = list(ids)
        for _ in range(max_new_tokens):
            out.append(int(self.logits(torch.tensor([out]))[0, -1].argmax()))
        return out[len(ids):]


@dataclass
class AccuracyReport:
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    perplexity_reference: float
    perplexity: float
    perplexity_increase_pct: float
    recovery_pct: float
    top1_agreement: float
    kl_divergence: float
    rouge1: float
    rouge_l: float
    eval_samples: int
    eval_seq_len: int
    calibration: dict = field(default_factory=dict)
    thresholds: Thresholds = field(default_factory=Thresholds)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def markdown_row(self, label: str | None = None) -> str:
        name = label or f"{self.quant_algo or 'none'}" + (f" + KV {self.kv_cache_quant_algo}" if self.kv_cache_quant_algo else "")
        return (f"| {name} | {self.perplexity:.3f} | {self.perplexity_increase_pct:+.2f}% | {self.recovery_pct:.2f}% | "
                f"{100 * self.top1_agreement:.2f}% | {self.kl_divergence:.4f} | {self.rouge_l:.3f} | "
                f"{'pass' if self.passed else 'FAIL'} |")


MARKDOWN_HEADER = ("| algo | perplexity | Δ ppl | recovery | top-1 agreement | KL | ROUGE-L | verdict |\n"
                   "|---|---|---|---|---|---|---|---|")


def compare(quantized: CheckpointRunner, reference: CheckpointRunner, windows: torch.Tensor,
            prompts: list[list[int]] | None = None, max_new_tokens: int = 16,
            thresholds: Thresholds | None = None, ref_logits: torch.Tensor | None = None,
            ref_generations: list[list[int]] | None = None) -> AccuracyReport:
    th = thresholds or Thresholds()
    lr = reference.logits(windows) if ref_logits is None else ref_logits
    lq = quantized.logits(windows)
    ppl_r, ppl_q = perplexity(lr, windows), perplexity(lq, windows)
    lm = logit_metrics(lq, lr)
    kl, agree = lm["kl_divergence"], lm["top1_agreement"]
    prompts = prompts or []
    gens = [quantized.generate(p, max_new_tokens) for p in prompts]
    refs = ref_generations if ref_generations is not None else [reference.generate(p, max_new_tokens) for p in prompts]
    rouge = mean_rouge(gens, refs[:len(prompts)])  # NaN without prompts
    q = quantized.quant
    rep = AccuracyReport(
        quant_algo=q.get("quant_algo"), kv_cache_quant_algo=q.get("kv_cache_quant_algo"),
        perplexity_reference=ppl_r, perplexity=ppl_q, perplexity_increase_pct=100 * (ppl_q / ppl_r - 1),
        recovery_pct=100 * ppl_r / ppl_q, top1_agreement=agree, kl_divergence=kl,
        rouge1=rouge["rouge1"], rouge_l=rouge["rouge_l"],
        eval_samples=windows.shape[0], eval_seq_len=windows.shape[1],
        calibration=quantized.config.get("kiln_quantization", {}), thresholds=th)
    if rep.perplexity_increase_pct > th.max_perplexity_increase_pct:
        rep.failures.append(f"perplexity +{rep.perplexity_increase_pct:.2f}% > {th.max_perplexity_increase_pct}%")
    if agree < th.min_top1_agreement:
        rep.failures.append(f"top-1 agreement {agree:.3f} < {th.min_top1_agreement}")
    if kl > th.max_kl_divergence:
        rep.failures.append(f"KL {kl:.4f} > {th.max_kl_divergence}")
    if prompts and rep.rouge_l < th.min_rouge_l:
        rep.failures.append(f"ROUGE-L {rep.rouge_l:.3f} < {th.min_rouge_l}")
    return rep


def accuracy_report(ckpt_dir: str | os.PathLike, reference: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                    *, samples: int = 8, seq_len: int = 256, prompts: list[str] | None = None,
                    max_new_tokens: int = 16, thresholds: Thresholds | None = None) -> AccuracyReport:
    """``reference``: the HF folder (converted in memory, float32) or an unquantized checkpoint dir."""
    ref_path = Path(reference)
    ref = (CheckpointRunner.from_dir(ref_path) if (ref_path / "rank0.safetensors").exists()
           else CheckpointRunner.from_hf(ref_path))
    windows = evaluation_windows(tokenizer_dir, samples, seq_len)
    prompt_ids = None
    if prompts:
        from .calibration import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return compare(CheckpointRunner.from_dir(ckpt_dir), ref, windows, prompt_ids, max_new_tokens, thresholds)


__all__ = ["AccuracyReport", "CheckpointRunner", "MARKDOWN_HEADER", "Thresholds", "accuracy_report", "compare",
           "perplexity", "stream_layers"]

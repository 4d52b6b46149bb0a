"""The worker's quantize -> build -> evaluate stages called in-process on a tiny model: the evaluate
stage is service.compiler.evaluate's report (its ROUGE, its HTML page), its summary and gate read from it."""

from __future__ import annotations

import json

import pytest

from service.compiler.evaluate import render_html
from service.compiler.evaluate import rouge as rouge_mod
from service.domain.spec import JobSpec
from service.workers import stages  # noqa: F401  (registers fetch and convert, which compile_stages follow)
from service.workers.compile_stages import (
    build_config,
    build_stage,
    evaluate_config,
    evaluate_stage,
    quantize_config,
    quantize_stage,
)
from service.workers.pipeline import StageContext

from .conftest import TINY_REPO

BUILD = {"backend": "torch", "target": "cpu", "max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128}


def _quiet(fraction, message):
    pass


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_model_dir):
    """fetch (the HF folder), convert, quantize (W8A16) and build outputs of one job."""
    from service.compiler import convert_checkpoint

    root = tmp_path_factory.mktemp("evalstage")
    spec = JobSpec(model=TINY_REPO, quantization={"algo": "W8A16"}, build=BUILD)
    convert_checkpoint(tiny_model_dir, root / "convert", dtype=spec.dtype)
    ctx = StageContext(job_id="j", spec=spec, settings=None, artifacts=None,
                       outputs={"fetch": tiny_model_dir, "convert": root / "convert"})
    quantize_stage(ctx, tiny_model_dir, root / "quantize", quantize_config(spec), _quiet)
    build_stage(ctx, root / "quantize", root / "build", build_config(spec), _quiet)
    return {"fetch": tiny_model_dir, "convert": root / "convert", "quantize": root / "quantize",
            "build": root / "build"}


@pytest.fixture
def rouge_calls(monkeypatch):
    """Every pair the one ROUGE scores, recorded on its way through (the real function scores it)."""
    calls: list[dict] = []
    real = rouge_mod.rouge_scores

    def recording(candidate, reference):
        calls.append(real(candidate, reference))
        return calls[-1]

    monkeypatch.setattr(rouge_mod, "rouge_scores", recording)
    return calls


def _mean(scores: list[dict], key: str) -> float:
    return sum(s[key] for s in scores) / len(scores)


def test_evaluate_stage_reports_through_the_compilers_evaluate(outputs, tmp_path, rouge_calls):
    spec = JobSpec(model=TINY_REPO, quantization={"algo": "W8A16"}, build=BUILD,
                   evaluation={"max_samples": 4, "seq_len": 32, "max_new_tokens": 6})
    ctx = StageContext(job_id="j", spec=spec, settings=None, artifacts=None, outputs=dict(outputs))
    seen: list[float] = []
    summary = evaluate_stage(ctx, outputs["build"], tmp_path / "report", evaluate_config(spec),
                             lambda f, m: seen.append(f))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    acc, eng = report["accuracy"], report["engine"]
    # four prompts each: the quantized vs the unquantized checkpoint, then the engine vs the reference runtime
    assert len(rouge_calls) == 8
    assert acc["rouge1"] == _mean(rouge_calls[:4], "rouge1") and acc["rouge_l"] == _mean(rouge_calls[:4], "rouge_l")
    assert eng["rouge1"] == _mean(rouge_calls[4:], "rouge1") and eng["rouge2"] == _mean(rouge_calls[4:], "rouge2")
    assert eng["rouge_l"] == _mean(rouge_calls[4:], "rouge_l") and eng["greedy_identical"] == 1.0
    assert eng["reference"] == "reference runtime on the quantized checkpoint"
    assert report["model"] == TINY_REPO and report["spec"]["evaluation"]["seq_len"] == 32
    assert (tmp_path / "report" / "report.html").read_text() == render_html(report)
    # the summary is the report's headline; the gate its verdict
    assert summary["passed"] is report["passed"] is True and summary["failures"] == report["failures"] == []
    assert summary["engine"] == {k: eng[k] for k in ("max_abs_logit_error", "top1_agreement", "greedy_identical",
                                                     "rouge1", "rouge_l", "perplexity")}
    assert summary["accuracy"]["rouge_l"] == acc["rouge_l"] and summary["gate"]["passed"] is True
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_evaluate_stage_gate_fails_on_the_reports_failures(outputs, tmp_path):
    spec = JobSpec(model=TINY_REPO, quantization={"algo": "W8A16", "thresholds": {"max_kl_divergence": 0.0}},
                   evaluation={"max_samples": 2, "seq_len": 16, "max_new_tokens": 4, "metrics": ["kl"]})
    ctx = StageContext(job_id="j", spec=spec, settings=None, artifacts=None,
                       outputs={k: outputs[k] for k in ("fetch", "convert", "quantize")})
    summary = evaluate_stage(ctx, outputs["quantize"], tmp_path / "report", evaluate_config(spec), _quiet)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "engine" not in report and summary["engine"] is None
    assert not report["passed"] and summary["failures"] == report["failures"]
    assert any(f.startswith("accuracy: KL") for f in report["failures"])
    assert summary["gate"]["passed"] is False and summary["gate"]["code"] == "accuracy_below_threshold"
    assert "KL" in summary["gate"]["message"]
    assert "FAILED" in (tmp_path / "report" / "report.html").read_text()


def test_build_stage_dequantizes_weight_only_checkpoints_for_a_float_only_backend(outputs, tmp_path):
    """The onnx backend refuses quantized checkpoints: the stage builds it from the compiler's
    dequantize_checkpoint, and says so."""
    pytest.importorskip("onnxruntime")
    from service.workers.compile_stages import backend_builds_quantized

    if backend_builds_quantized("onnx", "W8A16"):
        pytest.skip("the onnx backend builds W8A16 checkpoints itself now")
    spec = JobSpec(model=TINY_REPO, quantization={"algo": "W8A16"}, build={**BUILD, "backend": "onnx"})
    ctx = StageContext(job_id="j", spec=spec, settings=None, artifacts=None, outputs=dict(outputs))
    summary = build_stage(ctx, outputs["quantize"], tmp_path / "engine", build_config(spec), _quiet)
    assert summary["backend"] == "onnx" and summary["quant_algo"] == "W8A16"
    assert summary["weights"].startswith("built from W8A16 weights dequantized")
    assert json.loads((tmp_path / "engine" / "config.json").read_text())["backend"] == "onnx"
    assert summary["arch"] is None  # the onnx engine records no torch layout arch
    assert not list(tmp_path.glob(".tmp-dequant-*"))  # the scratch checkpoint is gone

"""evaluate(): metrics of a CPU engine against the reference runtime, report.json and .html."""

from __future__ import annotations

import json

import pytest
import torch

from service.compiler import convert_checkpoint
from service.compiler.build import BuildConfig, build
from service.compiler.evaluate import EvalConfig, evaluate, rouge_l, rouge_n

transformers = pytest.importorskip("transformers")
pytest.importorskip("service.compiler.reference", reason="evaluation compares against the reference runtime")


def test_rouge_matches_hand_computed_values():
    cand, ref = "the cat sat on the mat".split(), "the cat lay on the mat".split()
    assert rouge_n(cand, ref, 1) == pytest.approx(5 / 6)
    assert rouge_n(cand, ref, 2) == pytest.approx(3 / 5)
    assert rouge_l(cand, ref) == pytest.approx(5 / 6)
    assert rouge_n([1, 2, 3], [1, 2, 3], 2) == 1.0 and rouge_l([], []) == 0.0 and rouge_n([1], [], 1) == 0.0


def test_engine_evaluates_identical_to_reference_and_writes_reports(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=257, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float32")
    build(tmp_path / "ckpt", BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=128, target="cpu"),
          tmp_path / "engine")
    seen = []
    report = evaluate(tmp_path / "engine", tmp_path / "ckpt", EvalConfig(samples=4, seq_len=64, min_rouge1=0.99,
                                                                        min_top1_agreement=1.0),
                      tmp_path / "report", progress=lambda f, msg: seen.append(f))
    m = report["engine"]
    assert report["passed"] and not report["failures"] and "accuracy" not in report
    assert m["greedy_identical"] == 1.0 and m["rouge1"] == 1.0 and m["rouge2"] == 1.0 and m["rouge_l"] == 1.0
    assert m["top1_agreement"] == 1.0 and m["max_abs_logit_error"] < 1e-4 and m["prompts"] == 4
    assert m["perplexity"] == pytest.approx(m["perplexity_reference"], rel=1e-4) and m["perplexity"] > 1
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["passed"]
    page = (tmp_path / "report" / "report.html").read_text()
    assert "PASSED" in page and "<svg" in page and "ROUGE-1" in page

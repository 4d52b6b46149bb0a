"""evaluate() on a quantized checkpoint (the accuracy section), the quantizer's compare() taking its ROUGE
from the one implementation, and dequantize_checkpoint (the build adapter for float-only backends)."""

from __future__ import annotations

import json

import pytest
import torch

from service.compiler import convert_checkpoint
from service.compiler.errors import InvalidArgument
from service.compiler.evaluate import EvalConfig, evaluate, render_html
from service.compiler.evaluate import rouge as rouge_mod
from service.compiler.quantization import QuantConfig, quantize_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("service.compiler.runtime", reason="evaluation runs the reference runtime")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalq")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=200, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "hf", safe_serialization=True)
    convert_checkpoint(root / "hf", root / "float", dtype="float32")
    quantize_checkpoint(root / "hf", root / "w4", QuantConfig("W4A16", group_size=32), dtype="float32")
    return root


@pytest.fixture
def rouge_calls(monkeypatch):
    """Every (candidate, reference) pair scored by the one ROUGE, recorded on its way through (the
    real function computes the scores)."""
    calls: list[tuple[list, list, dict]] = []
    real = rouge_mod.rouge_scores

    def recording(candidate, reference):
        scores = real(candidate, reference)
        calls.append((list(candidate), list(reference), scores))
        return scores

    monkeypatch.setattr(rouge_mod, "rouge_scores", recording)
    return calls


def _mean(calls, key):
    return sum(c[2][key] for c in calls) / len(calls)


def test_evaluate_a_quantized_checkpoint_against_the_unquantized_one(ckpts, tmp_path, rouge_calls):
    seen = []
    cfg = EvalConfig(samples=3, seq_len=32, num_prompts=2, prompt_tokens=8, max_new_tokens=6,
                     thresholds={"min_top1_agreement": 0.0, "max_kl_divergence": 10.0, "min_rouge_l": 0.0,
                                 "max_perplexity_increase_pct": 100.0})
    report = evaluate(ckpts / "w4", ckpts / "float", cfg, tmp_path / "out", model="tiny",
                      progress=lambda f, msg: seen.append(msg))
    acc = report["accuracy"]
    assert "engine" not in report and report["model"] == "tiny" and report["passed"] and acc["passed"]
    assert acc["quant_algo"] == "W4A16" and acc["eval_samples"] == 3 and acc["eval_seq_len"] == 32
    assert report["data"] == {"source": "random token ids (the model has no tokenizer)", "samples": 3, "seq_len": 32,
                              "prompt_tokens": 8}
    # the accuracy ROUGE is the one ROUGE's, over the greedy continuations of the two prompts
    assert len(rouge_calls) == 2 and all(len(c) == len(r) == 6 for c, r, _ in rouge_calls)
    assert acc["rouge1"] == _mean(rouge_calls, "rouge1") and acc["rouge_l"] == _mean(rouge_calls, "rouge_l")
    assert any("greedy continuations" in m for m in seen)
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert (tmp_path / "out" / "report.html").read_text() == render_html(report)

    strict = evaluate(ckpts / "w4", ckpts / "float", EvalConfig(samples=2, seq_len=16, metrics=("perplexity",),
                                                                thresholds={"max_kl_divergence": 0.0}))
    assert not strict["passed"] and any(f.startswith("accuracy: KL") for f in strict["failures"])
    assert strict["accuracy"]["rouge1"] is None  # no generations without "rouge": NaN written as null
    with pytest.raises(InvalidArgument):
        evaluate(ckpts / "w4", ckpts / "float", unquantized=ckpts / "float")


def test_the_quantizers_compare_scores_rouge_with_the_one_implementation(ckpts, rouge_calls):
    from service.compiler.quantization.report import CheckpointRunner, compare

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    prompts = [ids[0, :5].tolist(), ids[1, :4].tolist(), [3]]
    rep = compare(CheckpointRunner.from_dir(ckpts / "w4"), CheckpointRunner.from_dir(ckpts / "float"), ids, prompts,
                  max_new_tokens=4)
    assert len(rouge_calls) == 3
    assert rep.rouge1 == _mean(rouge_calls, "rouge1") and rep.rouge_l == _mean(rouge_calls, "rouge_l")
    same = compare(CheckpointRunner.from_dir(ckpts / "float"), CheckpointRunner.from_dir(ckpts / "float"), ids,
                   prompts, max_new_tokens=4)
    assert same.rouge1 == same.rouge_l == 1.0 and len(rouge_calls) == 6


def test_dequantize_checkpoint_holds_the_weights_the_engine_multiplies_by(ckpts, tmp_path):
    from service.compiler.checkpoint.safetensors_io import SafetensorsFile
    from service.compiler.quantization.dequantize import dequantize_checkpoint
    from service.compiler.quantization.qlinear import dequantize_weight
    from service.compiler.reference import ReferenceModel

    assert dequantize_checkpoint(ckpts / "w4", tmp_path / "deq") == "W4A16"
    config = json.loads((tmp_path / "deq" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] is None and config["kiln_dequantized_from"] == "W4A16"
    with SafetensorsFile(ckpts / "w4" / "rank0.safetensors") as f:
        quant = {n: f.tensor(n).clone() for n in f.keys()}
    with SafetensorsFile(tmp_path / "deq" / "rank0.safetensors") as f:
        deq = {n: f.tensor(n).clone() for n in f.keys()}
    name = "transformer.layers.0.mlp.fc"
    assert quant[f"{name}.weight"].dtype == torch.int8 and deq[f"{name}.weight"].dtype == torch.float32
    qcfg = json.loads((ckpts / "w4" / "config.json").read_text())["quantization"]
    assert torch.equal(deq[f"{name}.weight"], dequantize_weight(quant, name, qcfg))
    assert not any(n.endswith("weights_scaling_factor") for n in deq)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(2))
    got = ReferenceModel.from_checkpoint(tmp_path / "deq").forward(ids)
    want = ReferenceModel.from_checkpoint(ckpts / "w4").forward(ids)  # executed from the int4 weights
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)

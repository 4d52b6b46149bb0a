"""validate_checkpoint: the expected set comes from config.json alone, so it judges checkpoints
written by any tool, and names every missing, unexpected and mis-shaped tensor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.compiler import Mapping, convert_checkpoint, from_checkpoint, validate_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=40)
    model = transformers.LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d, safe_serialization=True)
    return d, model.state_dict()


def test_checkpoint_written_by_another_tool_validates(hf_llama, tmp_path):
    """A tp=1 checkpoint assembled by hand, the way TensorRT-LLM's llama converter names things."""
    _, sd = hf_llama
    out = tmp_path / "other"
    out.mkdir()
    t = {"transformer.vocab_embedding.weight": sd["model.embed_tokens.weight"],
         "transformer.ln_f.weight": sd["model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(2):
        h, p = f"model.layers.{i}.", f"transformer.layers.{i}."
        t[p + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        t[p + "post_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        t[p + "attention.qkv.weight"] = torch.cat([sd[h + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        t[p + "attention.dense.weight"] = sd[h + "self_attn.o_proj.weight"]
        t[p + "mlp.fc.weight"] = sd[h + "mlp.gate_proj.weight"]
        t[p + "mlp.gate.weight"] = sd[h + "mlp.up_proj.weight"]
        t[p + "mlp.proj.weight"] = sd[h + "mlp.down_proj.weight"]
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "rank0.safetensors"))
    cfg = {"architecture": "LlamaForCausalLM", "dtype": "float32", "vocab_size": 40, "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 64,
           "hidden_act": "silu", "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
           "some_future_key": {"x": 1}}
    (out / "config.json").write_text(json.dumps(cfg))
    report = validate_checkpoint(out, strict=True)
    assert report.ok, report.errors
    # and it is byte-for-byte what Kiln writes for the same model
    ours = tmp_path / "ours"
    convert_checkpoint(hf_llama[0], ours, dtype="float32")
    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(ours / "rank0.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tampered_checkpoint_reports_each_problem_by_name(hf_llama, tmp_path):
    out = tmp_path / "ckpt"
    convert_checkpoint(hf_llama[0], out, dtype="float32", mapping=Mapping(tp_size=2))
    t = load_file(str(out / "rank1.safetensors"))
    del t["transformer.layers.1.mlp.gate.weight"]
    t["transformer.layers.0.attention.dense.weight"] = t["transformer.layers.0.attention.dense.weight"][:, :8].contiguous()
    t["transformer.layers.0.post_layernorm.weight"] = t["transformer.layers.0.post_layernorm.weight"].half()
    t["transformer.layers.9.extra.weight"] = torch.zeros(2)
    save_file(t, str(out / "rank1.safetensors"))
    report = validate_checkpoint(out)
    assert not report.ok
    r0, r1 = report.ranks
    assert r0.ok and not r0.missing
    assert r1.missing == ["transformer.layers.1.mlp.gate.weight"]
    assert r1.unexpected == ["transformer.layers.9.extra.weight"]
    assert any(m.startswith("transformer.layers.0.attention.dense.weight: expected [32, 16] F32, got [32, 8]")
               for m in r1.mismatched)
    assert any("post_layernorm.weight" in m and "F16" in m for m in r1.mismatched)
    assert not validate_checkpoint(out, strict=True).ok
    res = subprocess.run([sys.executable, "-m", "service.cli", "validate", str(out)], capture_output=True, text=True)
    assert res.returncode == 1
    assert "missing tensor transformer.layers.1.mlp.gate.weight" in res.stdout


def test_missing_rank_file_and_bad_config(hf_llama, tmp_path):
    out = tmp_path / "ckpt"
    convert_checkpoint(hf_llama[0], out, dtype="float32", mapping=Mapping(pp_size=2))
    (out / "rank1.safetensors").unlink()
    report = validate_checkpoint(out)
    assert not report.ok and any("rank1.safetensors: file is missing" in e for e in report.errors)
    (out / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM"}))
    report = validate_checkpoint(out)
    assert not report.ok and "lacks required keys" in report.errors[0]


def test_from_checkpoint_reads_back(hf_llama, tmp_path):
    out = tmp_path / "ckpt"
    convert_checkpoint(hf_llama[0], out, dtype="bfloat16", mapping=Mapping(tp_size=2, pp_size=2))
    ck = from_checkpoint(out)
    assert ck.mapping.world_size == 4 and ck.config["dtype"] == "bfloat16"
    names = dict(ck.tensors(3))
    assert "lm_head.weight" in names and names["lm_head.weight"].dtype == torch.bfloat16
    assert ck.validate(strict=True).ok

"""Converter output checked tensor by tensor against the HF weights it came from.

These tests pin the checkpoint layout itself (names, per-rank slices, fused qkv order, KV-head
duplication, lm_head padding, stage-local layer indices, dtypes), independently of any runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from service.compiler import Mapping, convert_checkpoint, from_hugging_face, validate_checkpoint

transformers = pytest.importorskip("transformers")


def _rank(out, r):
    return load_file(str(out / f"rank{r}.safetensors"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    model = transformers.LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d, safe_serialization=True)
    return d, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_llama_tp4_qkv_layout_duplicates_kv_heads_consecutively(llama_dir, tmp_path):
    src, sd = llama_dir
    out = tmp_path / "ckpt"
    convert_checkpoint(src, out, dtype="float32", mapping=Mapping(tp_size=4))
    d = 16
    q = sd["model.layers.1.self_attn.q_proj.weight"]
    k = sd["model.layers.1.self_attn.k_proj.weight"]
    v = sd["model.layers.1.self_attn.v_proj.weight"]
    for r in range(4):
        t = _rank(out, r)["transformer.layers.1.attention.qkv.weight"]
        assert t.shape == (3 * d, 64)
        kv_head = r // 2  # 2 KV heads over 4 ranks: h0, h0, h1, h1
        torch.testing.assert_close(t[:d], q[r * d:(r + 1) * d], rtol=0, atol=0)
        torch.testing.assert_close(t[d:2 * d], k[kv_head * d:(kv_head + 1) * d], rtol=0, atol=0)
        torch.testing.assert_close(t[2 * d:], v[kv_head * d:(kv_head + 1) * d], rtol=0, atol=0)


def test_llama_tp2_splits_and_lm_head_padding(llama_dir, tmp_path):
    src, sd = llama_dir
    out = tmp_path / "ckpt"
    convert_checkpoint(src, out, dtype="float32", mapping=Mapping(tp_size=2))
    r0, r1 = _rank(out, 0), _rank(out, 1)
    p = "transformer.layers.0."
    # gate_proj -> mlp.fc, up_proj -> mlp.gate (column split), down_proj -> mlp.proj (row split)
    torch.testing.assert_close(torch.cat([r0[p + "mlp.fc.weight"], r1[p + "mlp.fc.weight"]]),
                               sd["model.layers.0.mlp.gate_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([r0[p + "mlp.gate.weight"], r1[p + "mlp.gate.weight"]]),
                               sd["model.layers.0.mlp.up_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([r0[p + "mlp.proj.weight"], r1[p + "mlp.proj.weight"]], dim=1),
                               sd["model.layers.0.mlp.down_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([r0[p + "attention.dense.weight"], r1[p + "attention.dense.weight"]], 1),
                               sd["model.layers.0.self_attn.o_proj.weight"], rtol=0, atol=0)
    # vocab 101 padded to 102 rows, 51 per rank, the last row zero
    assert r0["lm_head.weight"].shape == (51, 64) and r1["lm_head.weight"].shape == (51, 64)
    head = torch.cat([r0["lm_head.weight"], r1["lm_head.weight"]])
    torch.testing.assert_close(head[:101], sd["lm_head.weight"], rtol=0, atol=0)
    assert torch.count_nonzero(head[101:]) == 0
    torch.testing.assert_close(r1["transformer.vocab_embedding.weight"], sd["model.embed_tokens.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert cfg["num_key_value_heads"] == 2 and cfg["head_size"] == 16
    assert cfg["rotary_scaling"]["type"] == cfg["rotary_scaling"]["rope_type"] == "llama3"
    assert cfg["rotary_scaling"]["factor"] == 8.0


def test_pp2_stage_local_layer_indices_and_stage_ownership(llama_dir, tmp_path):
    src, sd = llama_dir
    out = tmp_path / "ckpt"
    convert_checkpoint(src, out, dtype="float32", mapping=Mapping(tp_size=2, pp_size=2))
    for rank in range(4):
        t = _rank(out, rank)
        pp = rank // 2
        assert ("transformer.vocab_embedding.weight" in t) == (pp == 0)
        assert ("transformer.ln_f.weight" in t) == (pp == 1)
        assert ("lm_head.weight" in t) == (pp == 1)
        layer_ids = {int(n.split(".")[2]) for n in t if n.startswith("transformer.layers.")}
        assert layer_ids == {0, 1}
        # stage 1's local layer 0 is global layer 2
        torch.testing.assert_close(t["transformer.layers.0.input_layernorm.weight"],
                                   sd[f"model.layers.{2 * pp}.input_layernorm.weight"])


@pytest.mark.parametrize("dtype,expect", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                          ("auto", torch.float32)])
def test_dtypes_cast_every_tensor(llama_dir, tmp_path, dtype, expect):
    src, sd = llama_dir
    out = tmp_path / "ckpt"
    convert_checkpoint(src, out, dtype=dtype)
    t = _rank(out, 0)
    assert {v.dtype for v in t.values()} == {expect}
    torch.testing.assert_close(t["transformer.layers.2.mlp.fc.weight"],
                               sd["model.layers.2.mlp.gate_proj.weight"].to(expect), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["dtype"] == str(expect).replace("torch.", "")


def test_sharded_input_with_index_matches_single_file(llama_dir, tmp_path):
    src, sd = llama_dir
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((src / "config.json").read_text())
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: sd[n].contiguous() for n in part}, str(sharded / fname))
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = tmp_path / "a", tmp_path / "b"
    convert_checkpoint(src, a, dtype="float32", mapping=Mapping(tp_size=2))
    convert_checkpoint(sharded, b, dtype="float32", mapping=Mapping(tp_size=2))
    for r in range(2):
        ta, tb = _rank(a, r), _rank(b, r)
        assert ta.keys() == tb.keys()
        for n in ta:
            assert torch.equal(ta[n], tb[n]), n


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunking_and_copy_paths_give_identical_bytes(llama_dir, tmp_path, monkeypatch, dtype):
    """Kernel copies vs memory-mapped slices, big vs tiny row chunks, 1 vs 2 workers: same bytes."""
    import service.compiler.convert as conv

    src, _ = llama_dir
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    convert_checkpoint(src, a, dtype=dtype, mapping=Mapping(tp_size=2), workers=1)
    monkeypatch.setattr(conv, "CHUNK_BYTES", 256)
    convert_checkpoint(src, b, dtype=dtype, mapping=Mapping(tp_size=2), workers=2)
    monkeypatch.setattr(conv, "KERNEL_COPY", False)
    convert_checkpoint(src, c, dtype=dtype, mapping=Mapping(tp_size=2), workers=2)
    for r in range(2):
        ref = (a / f"rank{r}.safetensors").read_bytes()
        assert ref == (b / f"rank{r}.safetensors").read_bytes()
        assert ref == (c / f"rank{r}.safetensors").read_bytes()


def test_from_hugging_face_lazy_api_and_in_memory_tensors(llama_dir, tmp_path):
    src, sd = llama_dir
    model = from_hugging_face(src, dtype="float32", mapping=Mapping(tp_size=2))
    try:
        assert model.config["architecture"] == "LlamaForCausalLM"
        tensors = dict(model.tensors(1))
        assert tensors["transformer.layers.3.mlp.fc.weight"].shape == (48, 64)
        torch.testing.assert_close(tensors["transformer.layers.3.mlp.fc.weight"],
                                   sd["model.layers.3.mlp.gate_proj.weight"][48:])
        summary = model.save_checkpoint(tmp_path / "ckpt")
    finally:
        model.close()
    assert summary.tensors == 2 * (1 + 4 * 7 + 2) and summary.bytes > 0
    assert validate_checkpoint(tmp_path / "ckpt", strict=True).ok


def test_gpt2_conv1d_transposed_and_fused_qkv_split(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=99, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "gpt2")
    sd = model.state_dict()
    out = tmp_path / "ckpt"
    convert_checkpoint(tmp_path / "gpt2", out, dtype="float32", mapping=Mapping(tp_size=2))
    cfgj = json.loads((out / "config.json").read_text())
    assert cfgj["architecture"] == "GPTForCausalLM" and cfgj["position_embedding_type"] == "learned_absolute"
    w = sd["transformer.h.1.attn.c_attn.weight"].t()  # Conv1D [in, 3H] -> [3H, in]
    b = sd["transformer.h.1.attn.c_attn.bias"]
    for r in range(2):
        t = _rank(out, r)
        rows = torch.cat([torch.arange(r * 32, r * 32 + 32) + off for off in (0, 64, 128)])
        torch.testing.assert_close(t["transformer.layers.1.attention.qkv.weight"], w[rows])
        torch.testing.assert_close(t["transformer.layers.1.attention.qkv.bias"], b[rows])
        # row-parallel biases are whole on every rank
        torch.testing.assert_close(t["transformer.layers.1.attention.dense.bias"], sd["transformer.h.1.attn.c_proj.bias"])
        torch.testing.assert_close(t["transformer.layers.1.mlp.fc.weight"],
                                   sd["transformer.h.1.mlp.c_fc.weight"].t()[r * 128:(r + 1) * 128])
    assert validate_checkpoint(out, strict=True).ok


def test_opt_positions_drop_hf_offset_and_post_ln_has_no_ln_f(tmp_path):
    torch.manual_seed(2)
    cfg = transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                 vocab_size=50, max_position_embeddings=16, word_embed_proj_dim=32,
                                 do_layer_norm_before=False)
    model = transformers.OPTForCausalLM(cfg)
    model.save_pretrained(tmp_path / "opt")
    sd = model.state_dict()
    out = tmp_path / "ckpt"
    convert_checkpoint(tmp_path / "opt", out, dtype="float32")
    t = _rank(out, 0)
    pos = sd["model.decoder.embed_positions.weight"]
    assert pos.shape[0] == 18
    torch.testing.assert_close(t["transformer.position_embedding.weight"], pos[2:])
    assert "transformer.ln_f.weight" not in t
    assert json.loads((out / "config.json").read_text())["do_layer_norm_before"] is False
    assert validate_checkpoint(out, strict=True).ok


def test_output_written_atomically_no_temp_left(llama_dir, tmp_path):
    src, _ = llama_dir
    out = tmp_path / "ckpt"
    convert_checkpoint(src, out, dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "rank0.safetensors"]
    with safe_open(str(out / "rank0.safetensors"), "pt") as f:
        assert f.metadata()["producer"].startswith("kiln ")


def test_cli_convert_prints_summary_and_validate_reports_ok(llama_dir, tmp_path):
    src, _ = llama_dir
    out = tmp_path / "ckpt"
    res = subprocess.run(
        [sys.executable, "-m", "service.cli", "convert", str(src), str(out), "--dtype", "bfloat16",
         "--tp-size", "2", "--pp-size", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    line = next(x for x in lines if x.startswith("converted "))
    assert "62 tensors" in line and "GB/s" in line and "peak RSS" in line
    # pp > 1: the per-stage cost of the even and the cost-balanced split follow the summary
    assert lines[1].startswith("pipeline split used: even [2, 2]")
    assert lines[2].lstrip().startswith("even") and lines[3].lstrip().startswith("balanced")
    assert "convert" in res.stderr  # progress went to stderr
    res = subprocess.run([sys.executable, "-m", "service.cli", "validate", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("OK"), res.stdout


def test_cli_convert_resolves_repo_id_through_offline_hf_cache(llama_dir, tmp_path):
    from service.compiler.sources.smollm2 import install_into_hf_cache

    src, _ = llama_dir
    cache = tmp_path / "hf-cache"
    install_into_hf_cache(src, cache, repo_id="acme/tiny-llama")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "ckpt"
    res = subprocess.run(
        [sys.executable, "-m", "service.cli", "convert", "acme/tiny-llama", str(out), "--cache-dir", str(cache),
         "--dtype", "float32", "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert validate_checkpoint(out, strict=True).ok
    # an id that is not in the cache: a clean error, exit code 2, nothing written
    res = subprocess.run(
        [sys.executable, "-m", "service.cli", "convert", "acme/not-there", str(tmp_path / "x"), "--cache-dir",
         str(cache), "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2
    assert "error [model_not_found]" in res.stderr and "acme/not-there" in res.stderr
    assert not (tmp_path / "x").exists()

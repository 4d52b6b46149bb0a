"""Tensor-parallel torch engines: one process per rank (torch.distributed: gloo on the CPU, nccl on
two GPUs), each loading its own engine file; generations must equal the tp=1 engine's and
transformers'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.cli import main as kiln
from service.compiler import Mapping, convert_checkpoint
from service.compiler.build import BuildConfig, build
from service.compiler.engine.engine import Engine
from service.compiler.engine.ranks import run_ranks

transformers = pytest.importorskip("transformers")
PROMPTS = [[5, 17, 3, 88, 41, 9, 2], [60, 1, 33]]

# one rank of a tp engine, as a server runs it: join the group (NCCL for a GPU-built engine, gloo for
# a CPU one), load this rank's file, generate; rank 0 prints the result
RANK_MAIN = """
import argparse, json
from service.compiler.engine.engine import SamplingConfig, engine_in_group
from service.compiler.engine.ranks import add_rank_arguments, exit_rank
p = argparse.ArgumentParser()
p.add_argument("engine_dir"); p.add_argument("prompts"); add_rank_arguments(p)
a = p.parse_args()
with engine_in_group(a.engine_dir, a.rank, a.world_size, a.init_method) as engine:  # closed before the group ends
    res = engine.generate(json.loads(a.prompts), max_new_tokens=8)
    logits = engine.forward([json.loads(a.prompts)[0]])
    sampled = engine.generate(json.loads(a.prompts), max_new_tokens=8, sampling=SamplingConfig(temperature=1.0)).tokens
    out = {"tokens": res.tokens, "logits": logits.tolist(), "device": str(engine.device), "graphs": engine.use_graphs,
           "sampled": sampled}
print(json.dumps(out))
exit_rank(0)
"""


def _run_ranks(engine_dir: Path) -> dict:
    """Both ranks of a tp=2 engine, each in its own process; rank 0's tokens and logits. Unseeded
    sampling draws the same tokens on both ranks (rank 0's seed), else their steps would diverge."""
    outs = run_ranks(["-c", RANK_MAIN, str(engine_dir), json.dumps(PROMPTS)], 2, what="the tp=2 engine",
                     timeout_s=600)
    r0, r1 = (json.loads(o.strip().splitlines()[-1]) for o in outs)
    assert r0["sampled"] == r1["sampled"] and r0["tokens"] == r1["tokens"]
    return r0


def _tiny_tp2_checkpoint(tmp_path: Path, num_kv: int):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=num_kv, vocab_size=101, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", mapping=Mapping(tp_size=2))
    return model


@pytest.mark.parametrize("num_kv", [2, 1])  # 1 KV head over 2 ranks: the converter duplicates it
def test_tp2_engine_one_process_per_rank_matches_tp1(tmp_path, num_kv, capsys):
    model = _tiny_tp2_checkpoint(tmp_path, num_kv)
    bc = dict(max_batch_size=2, max_input_len=16, max_seq_len=48, target="cpu")
    build(tmp_path / "ckpt", BuildConfig(keep_tensor_parallel=True, **bc), tmp_path / "tp2")
    build(tmp_path / "ckpt", BuildConfig(**bc), tmp_path / "tp1")
    engine_cfg = json.loads((tmp_path / "tp2" / "config.json").read_text())
    assert engine_cfg["engine"]["tp_size"] == 2 and engine_cfg["engine"]["files"] == ["rank0.safetensors",
                                                                                      "rank1.safetensors"]
    with pytest.raises(Exception, match="tp=2 engine"):
        Engine.load(tmp_path / "tp2")  # not inside a process group
    got = _run_ranks(tmp_path / "tp2")
    # the build's compile step for a tp engine: `engine warmup` once per rank, inside its group
    outs = run_ranks(["-m", "service.compiler.engine.engine", "warmup", str(tmp_path / "tp2")], 2,
                     what="warming up the tp=2 engine", timeout_s=300)
    assert [json.loads(o.strip().splitlines()[-1])["weights_seconds"] >= 0 for o in outs] == [True, True]
    single = Engine.load(tmp_path / "tp1")
    assert got["tokens"] == single.generate(PROMPTS, max_new_tokens=8).tokens
    torch.testing.assert_close(torch.tensor(got["logits"]), single.forward([PROMPTS[0]]), rtol=1e-4, atol=1e-4)
    # `kiln generate` on a tp engine starts one process per rank itself
    ids = ",".join(map(str, PROMPTS[0]))
    assert kiln(["generate", str(tmp_path / "tp2"), "--ids", ids, "--max-new-tokens", "8", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["tokens"] == got["tokens"][0] and cli["tp_size"] == 2
    with torch.no_grad():
        hf = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got["tokens"][0] == hf[0, len(PROMPTS[0]):].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA GPUs (tp=2 over NCCL)")
def test_tp2_engine_on_two_gpus_nccl_compiled_graphs(tmp_path):
    """tp=2 on two GPUs: compiled steps with NCCL all-reduce / all-gather inside CUDA graphs, one
    process per rank; the build times it over both GPUs; tokens equal the tp=1 GPU engine's."""
    model = _tiny_tp2_checkpoint(tmp_path, 2)
    bc = dict(max_batch_size=2, max_input_len=16, max_seq_len=48, target="auto")
    build(tmp_path / "ckpt", BuildConfig(keep_tensor_parallel=True, **bc), tmp_path / "tp2")
    build(tmp_path / "ckpt", BuildConfig(**bc), tmp_path / "tp1")
    cfg = json.loads((tmp_path / "tp2" / "config.json").read_text())
    assert cfg["engine"]["compile_cache"] and cfg["build_stats"]["compile_seconds"] > 0  # both ranks compiled
    perf = json.loads((tmp_path / "tp2" / "performance.json").read_text())
    assert perf["tp_size"] == 2 and perf["device"] != "cpu", perf
    assert perf["decode_tokens_per_second_batch_1"] > 0 and perf["peak_gpu_memory_bytes"] > 0, perf
    got = _run_ranks(tmp_path / "tp2")
    assert got["device"] == "cuda:0" and got["graphs"] is True
    single = Engine.load(tmp_path / "tp1")
    assert single.use_graphs
    assert got["tokens"] == single.generate(PROMPTS, max_new_tokens=8).tokens
    torch.testing.assert_close(torch.tensor(got["logits"]), single.forward([PROMPTS[0]]), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        hf = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got["tokens"][0] == hf[0, len(PROMPTS[0]):].tolist()

"""Tensor-parallel torch engines: one process per rank (torch.distributed, gloo on CPU), each loading
its own engine file; generations must equal the tp=1 engine's and transformers'."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.compiler import Mapping, convert_checkpoint
from service.compiler.build import BuildConfig, build
from service.compiler.runtime.engine import Engine

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 3, 88, 41, 9, 2], [60, 1, 33]]

RANK_MAIN = """
import json, sys, torch.distributed as dist
from service.compiler.runtime.engine import Engine
rank, port, engine_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
engine = Engine.load(engine_dir)
res = engine.generate(json.loads(sys.argv[5]), max_new_tokens=8)
logits = engine.forward([json.loads(sys.argv[5])[0]])
if rank == 0:
    json.dump({"tokens": res.tokens, "logits": logits.tolist()}, open(out, "w"))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("num_kv", [2, 1])  # 1 KV head over 2 ranks: the converter duplicates it
def test_tp2_engine_one_process_per_rank_matches_tp1(tmp_path, num_kv):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=num_kv, vocab_size=101, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", mapping=Mapping(tp_size=2))
    bc = dict(max_batch_size=2, max_input_len=16, max_seq_len=48, target="cpu")
    build(tmp_path / "ckpt", BuildConfig(keep_tensor_parallel=True, **bc), tmp_path / "tp2")
    build(tmp_path / "ckpt", BuildConfig(**bc), tmp_path / "tp1")
    engine_cfg = json.loads((tmp_path / "tp2" / "config.json").read_text())
    assert engine_cfg["engine"]["tp_size"] == 2 and engine_cfg["engine"]["files"] == ["rank0.safetensors",
                                                                                      "rank1.safetensors"]
    with pytest.raises(Exception, match="tp=2 engine"):
        Engine.load(tmp_path / "tp2")  # not inside a process group
    port, out = str(_free_port()), tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_MAIN, str(r), port, str(tmp_path / "tp2"), str(out),
                               json.dumps(PROMPTS)], env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    got = json.loads(out.read_text())
    single = Engine.load(tmp_path / "tp1")
    assert got["tokens"] == single.generate(PROMPTS, max_new_tokens=8).tokens
    torch.testing.assert_close(torch.tensor(got["logits"]), single.forward([PROMPTS[0]]), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        hf = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got["tokens"][0] == hf[0, len(PROMPTS[0]):].tolist()

"""GPT-2 and OPT engines (layout kiln-gpt-fused/1) on CPU, torch and onnx backends, tp 1 and 2.

Tiny random GPT-2, pre-LN OPT and post-LN OPT (``do_layer_norm_before=False``, as opt-350m) are
converted from transformers models built here, then built; greedy generations must be identical to
the reference runtime's (the oracle) token for token, at batch 1 and batch 2 with different prompt
lengths (the torch engine right-pads; the onnx graphs take equal-length rows).
"""

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
from service.compiler.build import BuildConfig, InvalidBuildConfig, build
from service.compiler.build.config import validate_build
from service.compiler.checkpoint.validate import load_config
from service.compiler.engine.engine import Engine
from service.compiler.models.gpt import GPT_LAYOUT
from service.compiler.reference import ReferenceModel

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 3, 88, 41, 9, 2], [60, 1, 33], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 12]]
LIMITS = dict(max_batch_size=2, max_input_len=16, max_seq_len=48, target="cpu")
NEW = 10

ARCHS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_inner=96, vocab_size=101, n_positions=64)),
    "opt-pre-ln": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=103,
        max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=True)),
    "opt-post-ln": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=103,
        max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=False,
        activation_function="gelu")),
}


def _model(name: str):
    torch.manual_seed(0)
    model = ARCHS[name]().eval()
    with torch.no_grad():  # default init leaves biases at 0 and norms at 1; make every parameter matter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def ckpts(request, tmp_path_factory):
    name = request.param
    model = _model(name)
    root = tmp_path_factory.mktemp(name)
    model.save_pretrained(root / "hf", safe_serialization=True)
    convert_checkpoint(root / "hf", root / "ckpt1", dtype="float32")
    convert_checkpoint(root / "hf", root / "ckpt2", dtype="float32", mapping=Mapping(tp_size=2))
    return name, model, root


def _reference(ckpt: Path, prompts: list[list[int]], n: int = NEW) -> list[list[int]]:
    ref = ReferenceModel.from_checkpoint(ckpt)
    return [ref.generate(p, max_new_tokens=n) for p in prompts]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_torch_engine_matches_reference_at_batch_1_and_2(ckpts, tmp_path):
    name, model, root = ckpts
    build(root / "ckpt1", BuildConfig(**LIMITS), tmp_path / "engine")
    cfg = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert cfg["engine"]["layout"] == GPT_LAYOUT
    expect = _reference(root / "ckpt1", PROMPTS)
    assert expect[0] == _hf_greedy(model, PROMPTS[0], NEW)  # the oracle agrees with transformers
    engine = Engine.load(tmp_path / "engine")
    assert [engine.generate([p], NEW).tokens[0] for p in PROMPTS] == expect  # batch 1
    out = engine.generate(PROMPTS, NEW)  # batch 2 (right-padded, 7 and 3 tokens), then a chunk of 1
    assert out.tokens == expect and out.stats["batches"] == 2
    ref = ReferenceModel.from_checkpoint(root / "ckpt1")
    torch.testing.assert_close(engine.forward([PROMPTS[0]]), ref.forward([PROMPTS[0]]), rtol=1e-4, atol=1e-4)


def test_tp2_checkpoint_merged_engine_matches_reference(ckpts, tmp_path):
    _, _, root = ckpts
    build(root / "ckpt2", BuildConfig(**LIMITS), tmp_path / "engine")
    assert Engine.load(tmp_path / "engine").generate(PROMPTS[:2], NEW).tokens == _reference(root / "ckpt2",
                                                                                             PROMPTS[:2])


RANK_MAIN = """
import json, os, sys, torch.distributed as dist
from service.compiler.engine.engine import Engine
rank, port, engine_dir, out, prompts = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
engine = Engine.load(engine_dir)
batch = engine.generate(prompts[:2], max_new_tokens=int(sys.argv[6])).tokens
single = [engine.generate([p], max_new_tokens=int(sys.argv[6])).tokens[0] for p in prompts]
logits = engine.forward([prompts[0]])
if rank == 0:
    with open(out, "w") as f:
        json.dump({"batch": batch, "single": single, "logits": logits.tolist()}, f)
dist.destroy_process_group()
os._exit(0)  # past gloo's sometimes-aborting teardown (see ranks.exit_rank)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_engine_one_process_per_rank_matches_reference(ckpts, tmp_path):
    _, _, root = ckpts
    build(root / "ckpt2", BuildConfig(keep_tensor_parallel=True, **LIMITS), tmp_path / "tp2")
    engine_cfg = json.loads((tmp_path / "tp2" / "config.json").read_text())
    assert engine_cfg["engine"]["tp_size"] == 2 and engine_cfg["engine"]["layout"] == GPT_LAYOUT
    perf = json.loads((tmp_path / "tp2" / "performance.json").read_text())  # timed by 2 rank processes
    assert perf["tp_size"] == 2 and perf["max_batch_size"] == 2 and perf["peak_gpu_memory_bytes"] is None
    assert all(perf[k] > 0 for k in ("build_seconds", "load_seconds", "ttft_seconds",
                                     "decode_tokens_per_second_batch_1", "decode_tokens_per_second_max_batch"))
    port, out = str(_free_port()), tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_MAIN, str(r), port, str(tmp_path / "tp2"), str(out),
                               json.dumps(PROMPTS), str(NEW)], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    got = json.loads(out.read_text())
    expect = _reference(root / "ckpt2", PROMPTS)
    assert got["single"] == expect and got["batch"] == expect[:2]
    ref = ReferenceModel.from_checkpoint(root / "ckpt2")
    torch.testing.assert_close(torch.tensor(got["logits"]), ref.forward([PROMPTS[0]]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ckpt", ["ckpt1", "ckpt2"])
def test_onnx_engine_matches_reference(ckpts, tmp_path, ckpt):
    """Prefill + decode graphs (KV cache in and out) run by onnxruntime; a tp=2 checkpoint is merged."""
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    _, _, root = ckpts
    build(root / ckpt, BuildConfig(backend="onnx", **LIMITS), tmp_path / "onnx")
    cfg = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert cfg["backend"] == "onnx" and cfg["verification"]["greedy_identical"]
    assert cfg["verification"]["max_abs_logit_error"] < 1e-4
    prefill = ort.InferenceSession(str(tmp_path / "onnx" / "prefill.onnx"), providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(tmp_path / "onnx" / "decode.onnx"), providers=["CPUExecutionProvider"])

    def greedy(rows: list[list[int]]) -> list[list[int]]:
        logits, keys, values = prefill.run(None, {"input_ids": np.array(rows, dtype=np.int64)})
        toks = [logits[:, -1].argmax(-1)]
        for _ in range(NEW - 1):
            logits, keys, values = decode.run(None, {"input_ids": toks[-1][:, None].astype(np.int64),
                                                     "past_keys": keys, "past_values": values})
            toks.append(logits[:, -1].argmax(-1))
        return np.stack(toks, 1).tolist()

    same_len = [PROMPTS[0], PROMPTS[0][::-1]]
    assert greedy(same_len) == _reference(root / ckpt, same_len)  # batch 2
    assert [greedy([p])[0] for p in PROMPTS] == _reference(root / ckpt, PROMPTS)  # batch 1, three lengths


def test_tensorrt_still_refuses_gpt_and_unknown_architectures_are_refused(ckpts):
    _, _, root = ckpts
    cfg = load_config(root / "ckpt1")
    validate_build(BuildConfig(**LIMITS), cfg, machine_gpus=[])
    validate_build(BuildConfig(backend="onnx", **LIMITS), cfg, machine_gpus=[])
    with pytest.raises(InvalidBuildConfig, match="Llama family"):
        validate_build(BuildConfig(backend="tensorrt", **{**LIMITS, "target": "h100"}), cfg, machine_gpus=[])
    with pytest.raises(InvalidBuildConfig, match="BloomForCausalLM"):
        validate_build(BuildConfig(**LIMITS), {**cfg, "architecture": "BloomForCausalLM"}, machine_gpus=[])

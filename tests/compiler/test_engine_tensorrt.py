"""TensorRT / TensorRT-LLM backends. Builds run only where the packages import and a GPU is present;
elsewhere these tests skip with the reason (nothing is reported as run when it was not)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from service.compiler.build import BuildConfig, build
from service.compiler.build.backends.tensorrt_backend import _profiles
from service.compiler.build.backends.trtllm_backend import trtllm_build_command
from service.compiler.build.config import GpuTarget, validate_build

HAS_GPU = torch.cuda.is_available()
TRT = importlib.util.find_spec("tensorrt") is not None
TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None

CFG = {"architecture": "LlamaForCausalLM", "dtype": "float16", "hidden_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_size": 16, "intermediate_size": 96,
       "vocab_size": 101, "max_position_embeddings": 256}
H100 = GpuTarget("NVIDIA H100 80GB HBM3", 90, 80 << 30)


def _tiny_checkpoint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from service.compiler import convert_checkpoint

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float16")


def test_trtllm_build_command_maps_build_config():
    r = validate_build(BuildConfig(backend="trtllm", target="h100", max_batch_size=4, max_input_len=64,
                                   max_seq_len=128, kv_cache_type="paged"), CFG, machine_gpus=[H100])
    cmd = trtllm_build_command(Path("/ck"), r, Path("/out"))
    args = dict(zip(cmd[-18::2], cmd[-17::2], strict=True))
    assert args["--max_batch_size"] == "4" and args["--max_seq_len"] == "128" and args["--kv_cache_type"] == "paged"
    assert args["--max_num_tokens"] == str(4 * 64) and args["--checkpoint_dir"] == "/ck"


def test_tensorrt_profiles_span_the_build_limits():
    r = validate_build(BuildConfig(backend="tensorrt", target="h100", max_batch_size=8, max_input_len=64,
                                   max_seq_len=128), CFG, machine_gpus=[H100])
    pre = _profiles(r.config, CFG, "prefill")["input_ids"]
    assert pre[0] == (1, 1) and pre[2] == (8, 64)
    dec = _profiles(r.config, CFG, "decode")
    assert dec["past_keys"][2] == (2, 8, 2, 127, 16) and dec["input_ids"][2] == (8, 1)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="TensorRT builds need a CUDA GPU")
@pytest.mark.skipif(not TRT, reason="tensorrt does not import here (TensorRT cannot be installed on our machines)")
def test_tensorrt_engine_builds_from_the_onnx_graphs(tmp_path):
    _tiny_checkpoint(tmp_path)
    build(tmp_path / "ckpt", BuildConfig(backend="tensorrt", target="auto", max_batch_size=2, max_input_len=32,
                                         max_seq_len=64), tmp_path / "engine")
    cfg = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert cfg["backend"] == "tensorrt" and (tmp_path / "engine" / "decode.engine").stat().st_size > 0


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="trtllm-build needs a CUDA GPU")
@pytest.mark.skipif(not TRTLLM, reason="tensorrt_llm does not import here (TensorRT cannot be installed on our machines)")
def test_trtllm_builds_kilns_checkpoint(tmp_path):
    _tiny_checkpoint(tmp_path)
    build(tmp_path / "ckpt", BuildConfig(backend="trtllm", target="auto", max_batch_size=2, max_input_len=32,
                                         max_seq_len=64), tmp_path / "engine")
    cfg = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert {"version", "pretrained_config", "build_config"} <= set(cfg)

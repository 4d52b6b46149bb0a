"""torch-backend engines on a CUDA GPU (skipped elsewhere): the 1B shape built, compiled, captured
in CUDA graphs and compared with the reference runtime; a fresh load uses the shipped compile cache."""

from __future__ import annotations

import json

import pytest
import torch

from service.compiler.build import BuildConfig, build
from service.compiler.checkpoint.safetensors_io import SafetensorsWriter, dtype_name
from service.compiler.engine.engine import Engine
from service.compiler.models.llama import LLAMA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

LLAMA_1B = {  # Llama-3.2-1B's shape
    "architecture": "LlamaForCausalLM", "dtype": "float32", "vocab_size": 128256, "max_position_embeddings": 131072,
    "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_size": 64, "intermediate_size": 8192, "hidden_act": "silu", "norm_epsilon": 1e-5,
    "position_embedding_type": "rope_gpt_neox", "rotary_base": 500000.0,
    "rotary_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3", "type": "llama3"},
    "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}, "quantization": {"quant_algo": None},
    "tie_word_embeddings": True, "attn_bias": False, "mlp_bias": False,
}


@pytest.fixture(scope="module")
def ckpt_1b(tmp_path_factory):
    """Random weights with 1/sqrt(fan_in) scale (peaked logits: greedy choices are not near-ties)."""
    d = tmp_path_factory.mktemp("llama1b") / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_1B))
    names = LLAMA.expected(LLAMA_1B, 0)
    g = torch.Generator(device="cuda").manual_seed(0)
    with SafetensorsWriter(d / "rank0.safetensors", [(n, dtype_name(t), s) for n, s, t in names]) as w:
        for name, shape, dt in names:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=dt)
            else:
                std = 1.0 if "embedding" in name else shape[1] ** -0.5
                t = (torch.randn(shape, generator=g, device="cuda") * std).to(dt).cpu()
            w.write(name, 0, t)
    return d


def test_1b_shape_engine_matches_reference_runtime_on_gpu(ckpt_1b, tmp_path):
    from service.compiler.reference import ReferenceModel

    stats = build(ckpt_1b, BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=128, target="auto"),
                  tmp_path / "engine")
    cfg = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert cfg["engine"]["arch"].startswith("sm") and cfg["engine"]["compile_cache"] is not None
    assert stats["compile_seconds"] > 0
    engine = Engine.load(tmp_path / "engine")
    assert engine.use_graphs and engine.load_stats["compile_cache"] is not None
    prompts = [[1, 50, 900, 7000, 12, 5], [128000, 300], [42] * 20]
    out = engine.generate(prompts, max_new_tokens=16)
    ref = ReferenceModel.from_checkpoint(ckpt_1b, device="cuda")
    for p, got in zip(prompts, out.tokens, strict=True):
        assert got == ref.generate(p, max_new_tokens=16)
    torch.testing.assert_close(engine.forward([prompts[0]]), ref.forward([prompts[0]]).cpu(), rtol=1e-3, atol=1e-3)

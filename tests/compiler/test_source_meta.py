"""Meta consolidated checkpoints (params.json + consolidated.NN.pth) through the Llama converter.

A tiny Llama is built with transformers, written out the way Meta's training code shards it (by the
helper below: HF -> interleaved rotary rows, column-parallel weights split along dim 0, row-parallel
along dim 1, the embedding along dim 1 (Llama 2) or 0 (Llama 3), norms replicated), converted at
tp 1 and tp 2, and must generate transformers' greedy tokens; the converted checkpoint must equal the
one converted from the HF folder tensor for tensor. Shards that are pickles are refused unread.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from service.compiler import Mapping, convert_checkpoint
from service.compiler.errors import UnsafeWeights, WeightsMismatch
from service.compiler.reference import ReferenceModel
from service.compiler.sources.layout import detect_layout
from service.compiler.sources.meta import intermediate_size
from tests.meta_files import write_meta_checkpoint

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 88, 41, 9, 2], [60, 1, 33], [96]]
# Llama 2 style: vocab_size -1 in params.json, embedding split along its width
LLAMA2 = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
          "ffn_dim_multiplier": None, "norm_eps": 1e-5}
# Llama 3.1 style: vocabulary-split embedding, ffn_dim_multiplier, rope_theta, llama3 rope scaling
LLAMA31 = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100, "multiple_of": 32,
           "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}


def hf_llama(params: dict, vocab: int):
    rope = None
    if params.get("use_scaled_rope"):
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(
        hidden_size=params["dim"], num_hidden_layers=params["n_layers"], num_attention_heads=params["n_heads"],
        num_key_value_heads=params["n_kv_heads"], intermediate_size=intermediate_size(params), vocab_size=vocab,
        rms_norm_eps=params["norm_eps"], rope_theta=params.get("rope_theta", 10000.0), rope_scaling=rope,
        max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # norms start at 1: make them count
            else:
                p.mul_(4.0)  # larger weights: greedy tokens that depend on every layer
    return model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=[("llama2", LLAMA2, 102, 1), ("llama31", LLAMA31, 100, 0)], ids=lambda p: p[0])
def meta_model(request, tmp_path_factory):
    name, params, vocab, embed_dim = request.param
    model = hf_llama(params, vocab)
    root = tmp_path_factory.mktemp(name)
    write_meta_checkpoint(model, params, root / "meta", shards=2, embed_dim=embed_dim)
    model.save_pretrained(root / "hf", safe_serialization=True)
    return model, root


def test_layout_is_detected(meta_model):
    _, root = meta_model
    assert detect_layout(root / "meta") == "meta" and detect_layout(root / "hf") == "hf"


@pytest.mark.parametrize("tp", [1, 2])
def test_meta_shards_convert_and_generate_like_transformers(meta_model, tmp_path, tp):
    model, root = meta_model
    summary = convert_checkpoint(root / "meta", tmp_path / "ckpt", dtype="float32", mapping=Mapping(tp_size=tp))
    assert summary.architecture == "LlamaForCausalLM" and summary.tp_size == tp
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt")
    for prompt in PROMPTS:
        assert ref.generate(prompt, max_new_tokens=8) == hf_greedy(model, prompt, 8)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(ref.forward(ids), want, rtol=1e-4, atol=1e-4)


def test_meta_checkpoint_equals_the_hf_folders_conversion(meta_model, tmp_path):
    """Same model, two layouts: tp 2 x pp 2 checkpoints identical tensor for tensor, same config."""
    _, root = meta_model
    m = Mapping(tp_size=2, pp_size=2)
    convert_checkpoint(root / "meta", tmp_path / "from_meta", dtype="float32", mapping=m)
    convert_checkpoint(root / "hf", tmp_path / "from_hf", dtype="float32", mapping=m)
    a = json.loads((tmp_path / "from_meta" / "config.json").read_text())
    b = json.loads((tmp_path / "from_hf" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_key_value_heads", "norm_epsilon",
                "rotary_base", "tie_word_embeddings"):
        assert a[key] == b[key], key
    for rank in range(4):
        x, y = load_file(tmp_path / "from_meta" / f"rank{rank}.safetensors"), \
            load_file(tmp_path / "from_hf" / f"rank{rank}.safetensors")
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (rank, k)


def test_engine_built_from_meta_generates_like_transformers(meta_model, tmp_path):
    from service.compiler.build import BuildConfig, build
    from service.compiler.engine.engine import Engine

    model, root = meta_model
    convert_checkpoint(root / "meta", tmp_path / "ckpt", dtype="float32")
    build(tmp_path / "ckpt", BuildConfig(max_batch_size=4, max_input_len=16, max_seq_len=32, target="cpu",
                                         measure_performance=False), tmp_path / "engine")
    out = Engine.load(tmp_path / "engine").generate(PROMPTS, max_new_tokens=6)
    assert out.tokens == [hf_greedy(model, p, 6) for p in PROMPTS]


class Canary:
    """Unpickling this writes a file: proof that a loader ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("container", ["bare_pickle", "zip_archive"])
def test_a_shard_that_runs_code_is_refused_and_runs_nothing(meta_model, tmp_path, container):
    _, root = meta_model
    folder = tmp_path / "meta"
    folder.mkdir()
    for f in (root / "meta").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    canary = tmp_path / "canary"
    evil = {"tok_embeddings.weight": Canary(canary)}
    if container == "bare_pickle":
        (folder / "consolidated.01.pth").write_bytes(pickle.dumps(evil))
    else:
        torch.save(evil, folder / "consolidated.01.pth")
    with pytest.raises(UnsafeWeights, match="consolidated.01.pth"):
        convert_checkpoint(folder, tmp_path / "out", dtype="float32")
    assert not canary.exists()
    assert not (tmp_path / "out").exists()


def test_missing_or_mismatched_shards_are_typed_errors(meta_model, tmp_path):
    _, root = meta_model
    folder = tmp_path / "meta"
    folder.mkdir()
    for f in (root / "meta").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(WeightsMismatch, match="not numbered 0..1"):
        convert_checkpoint(folder, tmp_path / "out")
    (folder / "consolidated.02.pth").rename(folder / "consolidated.01.pth")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))
    with pytest.raises(WeightsMismatch, match="params.json implies"):
        convert_checkpoint(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llama3_params_map_to_an_hf_config(meta_model):
    from service.compiler.sources.meta import MetaConsolidatedSource

    _, root = meta_model
    src = MetaConsolidatedSource.open(root / "meta")
    try:
        hf = src.hf_config()
    finally:
        src.close()
    params = json.loads((root / "meta" / "params.json").read_text())
    assert hf["intermediate_size"] == (192 if params.get("ffn_dim_multiplier") is None else 224)
    if params.get("use_scaled_rope"):
        assert hf["rope_scaling"]["rope_type"] == "llama3" and hf["rope_theta"] == 500000.0
        assert hf["max_position_embeddings"] == 65536
    else:
        assert "rope_scaling" not in hf and hf["vocab_size"] == 102

"""GGUF files (llama.cpp) through the converters, checked against transformers' own GGUF loader.

Tiny random HF models are written here as GGUF with ``gguf.GGUFWriter`` the way llama.cpp's
converter writes them (its tensor names, Llama's q/k rows in interleaved rotary order, Gemma's norms
stored as 1 + w), with Q8_0, Q4_0, Q5_1 and K-quant (Q4_K, Q6_K: blocks of random codes, as the
``gguf`` package cannot quantize K-quants) tensors. The oracle is
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``: its state dict and config must equal
Kiln's mapping (every family), and, for the families Kiln converts today (Llama, Qwen2), the
converted checkpoint's greedy tokens must equal its own. Hostile files are typed errors that write
nothing. The real SmolLM2-135M Q4_1 GGUF runs end to end (slow).
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from service.compiler import Mapping, convert_checkpoint
from service.compiler.errors import KilnError, MalformedWeights, UnsupportedArchitecture
from service.compiler.reference import ReferenceModel
from service.compiler.sources.gguf import GGML_TYPES, GGUFSource, read_header
from service.compiler.sources.layout import detect_layout

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from tests.gguf_files import FAMILIES, Q, write_gguf  # noqa: E402  (needs gguf)

PROMPTS = [[5, 17, 3, 88, 41, 9, 2], [60, 1, 33], [90]]
@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """arch -> (gguf path, transformers' model loaded from that GGUF, float32)."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            torch.manual_seed(3)
            model = FAMILIES[arch](transformers).eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 1:
                        p.add_(0.1 * torch.randn_like(p))
                    else:
                        p.mul_(4.0)
            folder = tmp_path_factory.mktemp(arch)
            write_gguf(model, arch, folder / "model.gguf", np.random.default_rng(0))
            loaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model.gguf",
                                                                       dtype=torch.float32).eval()
            cache[arch] = (folder / "model.gguf", loaded)
        return cache[arch]

    return get


def test_block_sizes_match_the_gguf_package():
    for code, (name, block, size) in GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[Q(code)] == (block, size), name


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_mapping_equals_transformers_gguf_loader(gguf_models, arch):
    """HF names, dequantized values and config keys equal what transformers' GGUF loader produces."""
    path, hf_model = gguf_models(arch)
    src = GGUFSource.open(path)
    try:
        theirs = hf_model.state_dict()
        ours = set(src.names())
        expected = {k for k in theirs if not (k == "lm_head.weight" and hf_model.config.tie_word_embeddings)}
        assert ours == expected
        for name in ours:
            assert torch.equal(src.view(name).float(), theirs[name]), name
        cfg = hf_model.config
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                    "head_dim", "sliding_window"):
            if key in src.hf:
                assert src.hf[key] == getattr(cfg, key), key
        assert src.hf["rms_norm_eps"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
        assert src.hf["architectures"] == [type(hf_model).__name__]
    finally:
        src.close()


@pytest.mark.parametrize("arch,tp", [("llama", 1), ("llama", 2), ("qwen2", 1), ("qwen2", 2)])
def test_gguf_converts_and_generates_like_transformers(gguf_models, tmp_path, arch, tp):
    path, hf_model = gguf_models(arch)
    assert detect_layout(path) == "gguf"
    summary = convert_checkpoint(path, tmp_path / "ckpt", dtype="float32", mapping=Mapping(tp_size=tp))
    assert summary.architecture == type(hf_model).__name__
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt")
    for prompt in PROMPTS:
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert ref.generate(prompt, max_new_tokens=8) == want
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(ref.forward(ids), hf_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_auto_dtype_of_a_quantized_gguf_is_float16(gguf_models, tmp_path):
    path, _ = gguf_models("llama")
    convert_checkpoint(path, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == "float16"


def _llama_cpp_rope_freqs(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` Llama 3 ``rope_freqs`` (low 1, high 4, original context 8192)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4.0:
            out.append(1.0)
        elif wavelen > 8192 / 1.0:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_freqs_become_llama3_rope_scaling(tmp_path, factor):
    """Llama 3.1 / 3.2 GGUFs carry rope scaling as a rope_freqs tensor (which transformers ignores): Kiln
    reads it back as llama3 rope_scaling, and generates the tokens of an HF llama3 model with those weights."""
    T = transformers
    cfg = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=96, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(5)
    model = T.LlamaForCausalLM(T.LlamaConfig(**cfg, rope_theta=500000.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    freqs = _llama_cpp_rope_freqs(500000.0, 16, factor)
    assert (freqs != 1.0).any() and (freqs == 1.0).any()  # the scaling touches some dims, not all
    write_gguf(model, "llama", tmp_path / "m.gguf", np.random.default_rng(0), extra={"rope_freqs.weight": freqs})
    loaded = T.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    want_model = T.LlamaForCausalLM(T.LlamaConfig(**cfg, rope_theta=500000.0, rope_scaling=rope)).eval()
    want_model.load_state_dict(loaded.state_dict())
    convert_checkpoint(tmp_path / "m.gguf", tmp_path / "ckpt", dtype="float32")
    ckpt_cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert ckpt_cfg["rotary_scaling"]["rope_type"] == "llama3" and ckpt_cfg["rotary_scaling"]["factor"] == factor
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt")
    ids = torch.tensor([list(range(3, 90, 2))])  # 44 positions: long wavelengths matter
    with torch.no_grad():
        torch.testing.assert_close(ref.forward(ids), want_model(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(loaded(ids).logits, want_model(ids).logits, atol=1e-3)  # scaling changes logits

    bad = freqs.copy()
    bad[-1] *= 1.5
    write_gguf(model, "llama", tmp_path / "bad.gguf", np.random.default_rng(0), extra={"rope_freqs.weight": bad})
    with pytest.raises(UnsupportedArchitecture, match="rope_freqs"):
        convert_checkpoint(tmp_path / "bad.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_phi3_longrope_factors_become_longrope_scaling(tmp_path):
    """Phi-3.5's long context: llama.cpp writes the short/long rope factors as tensors and the original
    length as metadata (which transformers' GGUF loader ignores); Kiln reads them back as HF longrope, and its
    reference runtime matches an HF Phi-3 model with those weights and that scaling, past the original length."""
    from service.compiler.models.phi3 import attention_factor

    T = transformers
    cfg = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    short, long = [1.0 + 0.05 * i for i in range(8)], [1.5 + 0.4 * i for i in range(8)]
    rope = {"rope_type": "longrope", "short_factor": short, "long_factor": long}
    torch.manual_seed(6)
    model = T.Phi3ForCausalLM(T.Phi3Config(**cfg)).eval()
    extra = {"rope_factors_short.weight": np.array(short, dtype=np.float32),
             "rope_factors_long.weight": np.array(long, dtype=np.float32)}
    kv = {"phi3.rope.scaling.original_context_length": 16, "phi3.rope.scaling.attn_factor": attention_factor(64, 16)}
    write_gguf(model, "phi3", tmp_path / "m.gguf", np.random.default_rng(0), extra=extra, extra_kv=kv)
    loaded = T.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    want_model = T.Phi3ForCausalLM(T.Phi3Config(**cfg, original_max_position_embeddings=16, rope_scaling=rope)).eval()
    want_model.load_state_dict(loaded.state_dict())
    convert_checkpoint(tmp_path / "m.gguf", tmp_path / "ckpt", dtype="float32")
    ckpt_cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert ckpt_cfg["original_max_position_embeddings"] == 16
    assert ckpt_cfg["longrope_scaling_long_factors"] == pytest.approx(long)
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt")
    for n in (12, 30):  # below the original length (short factors), past it (long factors)
        ids = torch.tensor([list(range(3, 3 + n))])
        with torch.no_grad():
            torch.testing.assert_close(ref.forward(ids), want_model(ids).logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ids = torch.tensor([list(range(3, 33))])
        assert not torch.allclose(loaded(ids).logits, want_model(ids).logits, atol=1e-3)  # the factors matter

    del extra["rope_factors_short.weight"]  # one factor set without its pair
    write_gguf(model, "phi3", tmp_path / "bad.gguf", np.random.default_rng(0), extra=extra, extra_kv=kv)
    with pytest.raises(MalformedWeights, match="rope_factors_short"):
        convert_checkpoint(tmp_path / "bad.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- hostile files -----------------------------------------------------------------------------
def _header_end(path) -> int:
    return read_header(path).data_start


def test_every_truncation_is_a_typed_error_and_writes_nothing(gguf_models, tmp_path):
    path, _ = gguf_models("qwen2")
    data = path.read_bytes()
    end = _header_end(path)
    cuts = sorted({0, 3, 4, 8, 16, 23, 24, 30, 60, 200, end - 1, end, end + 100, len(data) - 1}
                  | set(range(24, end, max(1, end // 40))))
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(KilnError) as info:
            convert_checkpoint(bad, tmp_path / "out")
        assert info.value.code in ("malformed_weights", "model_not_found"), (cut, info.value)
        assert not (tmp_path / "out").exists()


def test_corrupted_headers_are_typed_errors(gguf_models, tmp_path):
    """Random byte flips in the header: a typed error or a valid file, never another exception."""
    path, _ = gguf_models("qwen2")
    data = bytearray(path.read_bytes())
    end = _header_end(path)
    rng = np.random.default_rng(1)
    for i in range(150):
        bad = bytearray(data)
        for pos in rng.integers(4, end, 3):
            bad[pos] = int(rng.integers(0, 256))
        f = tmp_path / f"flip{i}.gguf"
        f.write_bytes(bytes(bad))
        try:
            src = GGUFSource.open(f)
        except KilnError:
            continue
        src.close()
        f.unlink()


def _patch_first_tensor(path, tmp_path, *, ggml_type=None, offset=None) -> object:
    """A copy of the file with the first tensor-info record's type or offset replaced."""
    data = bytearray(path.read_bytes())
    header = read_header(path)
    first = next(iter(header.tensors.values()))
    name = first.name.encode()
    pos = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    pos += 4 + 8 * n_dims
    if ggml_type is not None:
        struct.pack_into("<I", data, pos, ggml_type)
    if offset is not None:
        struct.pack_into("<Q", data, pos + 4, offset)
    out = tmp_path / "patched.gguf"
    out.write_bytes(bytes(data))
    return out


def test_out_of_file_offsets_overlaps_and_unknown_types_are_refused(gguf_models, tmp_path):
    path, _ = gguf_models("qwen2")
    with pytest.raises(MalformedWeights, match="file has"):
        read_header(_patch_first_tensor(path, tmp_path, offset=1 << 40))
    with pytest.raises(MalformedWeights, match="overlap|not aligned"):
        read_header(_patch_first_tensor(path, tmp_path, offset=32))
    with pytest.raises(UnsupportedArchitecture, match="ggml type 19"):  # IQ1_S
        read_header(_patch_first_tensor(path, tmp_path, ggml_type=19))
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + path.read_bytes()[4:])
    with pytest.raises(KilnError):
        convert_checkpoint(bad, tmp_path / "out")
    huge = bytearray(path.read_bytes())
    struct.pack_into("<Q", huge, 16, 1 << 62)  # metadata entry count
    (tmp_path / "huge.gguf").write_bytes(bytes(huge))
    with pytest.raises(MalformedWeights, match="limit"):
        read_header(tmp_path / "huge.gguf")
    assert not (tmp_path / "out").exists()


def test_unsupported_gguf_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitecture, match="'mamba'"):
        convert_checkpoint(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the real model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_gguf_builds_and_generates_like_transformers(tmp_path):
    from service.compiler.build import BuildConfig, build
    from service.compiler.engine.engine import Engine
    from service.compiler.errors import ModelNotFound
    from service.compiler.sources.smollm2 import gguf_path

    try:
        path = gguf_path()
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    summary = convert_checkpoint(path, tmp_path / "ckpt", dtype="float32")
    assert summary.architecture == "LlamaForCausalLM"
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    build(tmp_path / "ckpt", BuildConfig(max_batch_size=2, max_input_len=64, max_seq_len=96, target="cpu",
                                         measure_performance=False), tmp_path / "engine")
    engine = Engine.load(tmp_path / "engine")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompt = "The capital of France is"
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    out = engine.generate([prompt], max_new_tokens=16)  # the engine's own tokenizer, from the GGUF
    assert out.tokens[0] == want
    assert engine.generate([ids], max_new_tokens=16).tokens[0] == want


def test_a_gguf_without_tokenizer_has_no_calibration_tokenizer(gguf_models):
    from service.compiler.quantization.calibration import load_tokenizer

    assert load_tokenizer(gguf_models("llama")[0]) is None


@pytest.mark.slow
def test_calibration_tokenizer_comes_from_the_gguf():
    """Quantizing a GGUF source calibrates with the file's own tokenizer (transformers rebuilds it: ~1 min)."""
    from service.compiler.errors import ModelNotFound
    from service.compiler.quantization.calibration import load_tokenizer
    from service.compiler.sources.smollm2 import gguf_path

    try:
        path = gguf_path()
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    tok = load_tokenizer(path)
    want = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tok("The capital of France is")["input_ids"] == want("The capital of France is")["input_ids"]


def test_kiln_convert_cli_reads_a_gguf_file_and_refuses_a_broken_one(gguf_models, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    path, _ = gguf_models("qwen2")

    def kiln(*args):
        return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=root, capture_output=True, text=True,
                              timeout=300)

    ok = kiln("convert", str(path), str(tmp_path / "ckpt"), "--dtype", "float32", "--tp-size", "2", "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert "converted Qwen2ForCausalLM" in ok.stdout
    assert kiln("validate", str(tmp_path / "ckpt")).returncode == 0
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:1000])
    bad = kiln("convert", str(tmp_path / "cut.gguf"), str(tmp_path / "out"), "--quiet")
    assert bad.returncode != 0 and "malformed_weights" in bad.stderr and not (tmp_path / "out").exists()

"""The torch engine executes quantized checkpoints from their stored low-precision tensors (CPU here;
the GPU kernels are checked in test_engine_gpu.py and benchmarks/kernel_bench.py).

For every algo the engine runs: the engine file keeps FP8 / int8 / packed int4 weights (no float copy),
its logits equal the reference arithmetic (``CheckpointRunner`` over the quantized checkpoint, which
executes through ``quantization.qlinear``), greedy generations are identical, and algos the engine
cannot run are refused before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from service.compiler.build import BuildConfig, build  # noqa: E402
from service.compiler.build.config import InvalidBuildConfig  # noqa: E402
from service.compiler.checkpoint.safetensors_io import SafetensorsFile  # noqa: E402
from service.compiler.engine.engine import Engine  # noqa: E402
from service.compiler.engine.engine_quant import int4_block_for, pack_int4_halves, unpack_int4_halves  # noqa: E402
from service.compiler.quantization import CalibrationSettings, QuantConfig, quantize_checkpoint  # noqa: E402
from service.compiler.quantization.report import CheckpointRunner  # noqa: E402

VOCAB = 128
IDS = torch.randint(0, VOCAB, (10, 24), generator=torch.Generator().manual_seed(0))
PROMPTS = [[5, 17, 99, 3, 42, 7], [88, 1, 64]]

CASES = {  # id: (QuantConfig kwargs, engine dtype of layers.0.qkv.weight)
    "fp8": (dict(quant_algo="FP8"), torch.float8_e4m3fn),
    "fp8-rowwise": (dict(quant_algo="FP8_PER_CHANNEL_PER_TOKEN"), torch.float8_e4m3fn),
    "w8a16": (dict(quant_algo="W8A16"), torch.int8),
    "w4a16": (dict(quant_algo="W4A16"), torch.int8),
    "awq": (dict(quant_algo="W4A16_AWQ", group_size=64, awq_grid=4), torch.int8),
    "awq-zero-int8kv": (dict(quant_algo="W4A16_AWQ", group_size=64, awq_grid=4, has_zero_point=True,
                             kv_cache_quant_algo="INT8"), torch.int8),
    "fp8-fp8kv": (dict(quant_algo="FP8", kv_cache_quant_algo="FP8"), torch.float8_e4m3fn),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("input_layernorm.weight"):
                p[:4] *= 8.0  # outlier channels, as real models have
    out = tmp_path_factory.mktemp("qeng") / "hf"
    model.eval().save_pretrained(out)
    return out


def _calib() -> CalibrationSettings:
    return CalibrationSettings(samples=8, seq_len=24, heldout_samples=2, awq_tokens=128, token_ids=IDS)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_engine_matches_the_reference_arithmetic(llama, tmp_path, case):
    kw, wdtype = CASES[case]
    ckpt = tmp_path / "ckpt"
    quantize_checkpoint(llama, ckpt, QuantConfig(**kw), calibration=_calib(), dtype="float32")
    build(ckpt, BuildConfig(max_batch_size=2, max_input_len=32, max_seq_len=64, target="cpu"), tmp_path / "engine")
    with SafetensorsFile(tmp_path / "engine" / "rank0.safetensors") as f:
        names = set(f.keys())
        assert f.tensor("layers.0.qkv.weight").dtype == wdtype
        assert f.tensor("layers.1.down.weight").dtype == wdtype
        assert f.tensor("lm_head").dtype == torch.float32  # lm_head stays float (excluded by default)
    assert ("layers.0.kv_scale" in names) == ("kv_cache_quant_algo" in kw)

    ref = CheckpointRunner.from_dir(ckpt)
    engine = Engine.load(tmp_path / "engine")
    ids = IDS[:2, :16]
    got, want = engine.forward(ids), ref.logits(ids)
    err = float((got - want).norm() / want.norm())
    assert err < 1e-4, err
    out = engine.generate(PROMPTS, max_new_tokens=8)
    assert out.tokens == [ref.generate(p, 8) for p in PROMPTS]


def test_the_engine_really_runs_the_low_precision_weights(llama, tmp_path):
    """Corrupting one stored int4 nibble pattern changes the engine's logits: no float copy is used."""
    ckpt = tmp_path / "ckpt"
    quantize_checkpoint(llama, ckpt, QuantConfig(quant_algo="W4A16"), calibration=_calib(), dtype="float32")
    build(ckpt, BuildConfig(max_batch_size=1, max_input_len=32, max_seq_len=64, target="cpu"), tmp_path / "engine")
    engine = Engine.load(tmp_path / "engine")
    before = engine.forward(IDS[:1, :8])
    qkv = engine.model.layers[0][1]
    qkv.weight.zero_()
    assert not torch.allclose(engine.forward(IDS[:1, :8]), before)


@pytest.mark.parametrize("algo", ["W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"])
def test_algos_the_engine_cannot_run_are_refused_before_writing(llama, tmp_path, algo):
    ckpt = tmp_path / "ckpt"
    quantize_checkpoint(llama, ckpt, QuantConfig(quant_algo=algo, alpha_grid=(0.5, 1.0)), calibration=_calib(),
                        dtype="float32")
    with pytest.raises(InvalidBuildConfig, match="trtllm"):
        build(ckpt, BuildConfig(target="cpu"), tmp_path / "engine")
    assert not (tmp_path / "engine").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".engine")]


@pytest.mark.parametrize("k,group", [(512, 0), (256, 128), (192, 64), (128, 0)])
def test_int4_halves_packing_round_trips(k, group):
    q = torch.randint(-8, 8, (6, k), dtype=torch.int8)
    block = int4_block_for(k, group)
    packed = pack_int4_halves(q, block)
    assert packed.shape == (6, k // 2)
    assert torch.equal(unpack_int4_halves(packed, block), q)
    # byte j of a block holds k = j (low nibble) and k = block/2 + j (high nibble)
    b = packed.view(torch.uint8).to(torch.int16)
    lo = torch.where((b & 15) > 7, (b & 15) - 16, b & 15)
    assert torch.equal(lo[:, : block // 2].to(torch.int8), q[:, : block // 2])


def test_int4_decode_kernel_choice(monkeypatch):
    """Per-channel W4A16 with bf16/fp16 activations: one row takes the CUDA-core kernel (sixth
    session's H100 sweep), more rows the bit-unpacking one; group-wise int4 (AWQ scales, zeros) takes
    the CUDA-core word kernel for one row and converts otherwise, as float32 does;
    KILN_INT4_BATCH1_KERNEL and the int4_fast argument override; bad values are refused."""
    from service.compiler.engine.engine_quant import int4_gemv_kernel

    per_row, one = torch.ones(64), torch.ones(1)
    bf16 = torch.bfloat16
    monkeypatch.delenv("KILN_INT4_BATCH1_KERNEL", raising=False)
    assert int4_gemv_kernel(bf16, 1, per_row, 1024, 0, None, None) == "cuda_cores"
    assert int4_gemv_kernel(torch.float16, 1, per_row, 1024, 0, None, None) == "cuda_cores"
    assert int4_gemv_kernel(bf16, 2, per_row, 1024, 0, None, None) == "unpack"
    assert int4_gemv_kernel(bf16, 1, per_row, 1024, 0, None, None, tiles_given=True) == "unpack"
    assert int4_gemv_kernel(torch.float32, 1, per_row, 1024, 0, None, None) == "convert"
    groups = torch.ones(64, 2)
    assert int4_gemv_kernel(bf16, 1, groups, 256, 128, None, None) == "cuda_cores_words"  # groups: the words
    assert int4_gemv_kernel(bf16, 1, groups, 256, 128, torch.ones(256), groups) == "cuda_cores_words"  # AWQ + zero
    assert int4_gemv_kernel(bf16, 2, groups, 256, 128, None, None) == "convert"  # groups, more rows
    assert int4_gemv_kernel(torch.float32, 1, groups, 256, 128, None, None) == "convert"
    assert int4_gemv_kernel(bf16, 1, groups, 256, 128, None, None, int4_fast="word") == "cuda_cores_words"
    assert int4_gemv_kernel(bf16, 1, one, 1024, 0, None, None) == "convert"  # one scale for the tensor
    assert int4_gemv_kernel(bf16, 1, per_row, 0, 0, None, None) == "convert"  # packed along K the old way
    assert int4_gemv_kernel(bf16, 1, per_row, 1024, 0, None, None, int4_fast=False) == "convert"
    assert int4_gemv_kernel(bf16, 1, per_row, 1024, 0, None, None, int4_fast=True) == "unpack"
    assert int4_gemv_kernel(torch.float32, 3, per_row, 1024, 0, None, None, int4_fast="vec") == "cuda_cores_bytes"
    with pytest.raises(ValueError, match="per channel only on bytes"):
        int4_gemv_kernel(bf16, 1, torch.ones(64, 2), 256, 128, None, None, int4_fast="vec")
    assert int4_gemv_kernel(bf16, 1, per_row, 1024, 0, None, None, int4_fast="word") == "cuda_cores_words"
    monkeypatch.setenv("KILN_INT4_BATCH1_KERNEL", "tensor_cores")
    assert int4_gemv_kernel(bf16, 1, per_row, 1024, 0, None, None) == "unpack"
    assert int4_gemv_kernel(bf16, 1, groups, 256, 128, None, None) == "convert"  # the old choice for groups
    for forced in ("cuda_cores_words", "cuda_cores_bytes"):
        monkeypatch.setenv("KILN_INT4_BATCH1_KERNEL", forced)
        assert int4_gemv_kernel(bf16, 1, per_row, 1024, 0, None, None) == forced
    assert int4_gemv_kernel(bf16, 4, per_row, 1024, 0, None, None) == "unpack"
    assert int4_gemv_kernel(torch.float32, 1, per_row, 1024, 0, None, None) == "convert"
    monkeypatch.setenv("KILN_INT4_BATCH1_KERNEL", "fastest")
    with pytest.raises(ValueError, match="KILN_INT4_BATCH1_KERNEL"):
        int4_gemv_kernel(bf16, 1, per_row, 1024, 0, None, None)


def test_engine_header_specs_come_from_shapes_and_match_the_tensors(llama, tmp_path):
    """The build lays the engine file out from ``quantized_layer_specs`` (meta tensors, no bytes read)
    and computes each layer's tensors once; the specs equal the tensors, and a checkpoint whose fused
    AWQ pre-quant scales differ is still refused when the tensors are made."""
    from service.compiler.engine.engine_quant import quantized_layer_specs, quantized_layer_tensors
    from service.compiler.errors import InvalidCheckpoint

    ckpt = tmp_path / "ckpt"
    quantize_checkpoint(llama, ckpt, QuantConfig(**CASES["awq-zero-int8kv"][0]), calibration=_calib(), dtype="float32")
    quant = json.loads((ckpt / "config.json").read_text())["quantization"]
    with SafetensorsFile(ckpt / "rank0.safetensors") as f:
        tensors = {n: f.tensor(n).clone() for n in f.keys()}
    for layer in (0, 1):
        real = quantized_layer_tensors(tensors, layer, quant)
        assert quantized_layer_specs(tensors, layer, quant) == {n: (t.dtype, tuple(t.shape)) for n, t in real.items()}
        assert f"layers.{layer}.gate_up.pqs" in real and f"layers.{layer}.kv_scale" in real
    tensors["transformer.layers.1.mlp.gate.prequant_scaling_factor"] *= 1.5
    assert "layers.1.gate_up.pqs" in quantized_layer_specs(tensors, 1, quant)
    with pytest.raises(InvalidCheckpoint, match="different AWQ pre-quant scales"):
        quantized_layer_tensors(tensors, 1, quant)

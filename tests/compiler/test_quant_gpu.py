"""The quantizer's real FP8 GEMM on the GPU (``torch._scaled_mm``) agrees with its CPU simulation, and the
reference runtime runs an FP8 checkpoint on the GPU from its E4M3 tensors. Skipped without a CUDA GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def _fp8_ok() -> bool:
    from service.compiler.quantization.fp8 import fp8_gemm_available

    return fp8_gemm_available(torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available() and not _fp8_ok(), reason="needs SM >= 8.9 for FP8")
def test_scaled_mm_fp8_matches_the_simulation():
    from service.compiler.quantization.fp8 import (
        fp8_linear,
        quantize_per_tensor,
        scale_from_amax,
        scaled_mm_fp8,
    )

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1024, generator=g)
    w8, ws = quantize_per_tensor(torch.randn(512, 1024, generator=g) * 0.02)
    a = scale_from_amax(x.abs().max()).reshape(1)
    sim = fp8_linear(x, w8, ws, a)  # CPU: float32 simulation
    real = scaled_mm_fp8(x.cuda(), w8.cuda(), ws, a).cpu()
    assert torch.allclose(real, sim, rtol=1e-3, atol=1e-3 * float(sim.abs().max()))


@pytest.mark.skipif(torch.cuda.is_available() and not _fp8_ok(), reason="needs SM >= 8.9 for FP8")
def test_reference_runtime_runs_fp8_checkpoint_on_gpu(tmp_path):
    transformers = pytest.importorskip("transformers")
    from service.compiler.quantization import CalibrationSettings, QuantConfig, quantize_checkpoint
    from service.compiler.reference.model import ReferenceModel

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 128, (10, 32), generator=torch.Generator().manual_seed(0))
    quantize_checkpoint(tmp_path / "hf", tmp_path / "fp8", QuantConfig("FP8", kv_cache_quant_algo="FP8"),
                        calibration=CalibrationSettings(samples=8, seq_len=32, token_ids=ids), dtype="float32")
    cpu = ReferenceModel.from_checkpoint(tmp_path / "fp8").forward(ids[:2])
    gpu = ReferenceModel.from_checkpoint(tmp_path / "fp8", device="cuda").forward(ids[:2]).cpu()
    # The random model's logits span only +-0.83, so near-ties are common: the E4M3 GEMM accumulates in another
    # order than the CPU's float32 simulation and an activation rounded to the next E4M3 step flips a few. On the
    # H200 (2026-12-03) 60 of 64 positions agree (0.9375) with max |gpu - cpu| 3% of the largest logit, bit for bit
    # the same before and after the composable-decoder change; the H100 run of 2026-11 agreed on more than 95%.
    assert (cpu.argmax(-1) == gpu.argmax(-1)).float().mean() >= 0.9
    assert float((cpu - gpu).abs().max()) < 0.05 * float(cpu.abs().max())

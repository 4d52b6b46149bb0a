"""FP8 GPTQ rounding on a CUDA GPU (skipped elsewhere): each block's column loop replayed as a CUDA
graph gives the same E4M3 codes as the eager loop, for every block shape (full and ragged blocks,
one scale or row-stacked scales), and a whole quantize run writes the same checkpoint either way."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from service.compiler.quantization import (  # noqa: E402
    CalibrationSettings,
    QuantConfig,
    fp8,  # noqa: E402
    quantize_checkpoint,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


@pytest.mark.parametrize("rows,cols,stacked", [(96, 256, False), (200, 300, True), (64, 100, False)])
def test_gptq_block_graph_codes_equal_the_eager_loop(rows, cols, stacked):
    g = torch.Generator(device="cuda").manual_seed(0)
    mix = torch.randn(cols, cols, generator=g, device="cuda") * torch.logspace(0, -2, cols, device="cuda")[None, :]
    x = torch.randn(2048, cols, generator=g, device="cuda") @ mix
    w = torch.randn(rows, cols, generator=g, device="cuda") * 0.05
    if stacked:  # fc + gate: two tensors with their own scales, rounded against one Hessian
        scale = torch.cat([fp8.scale_from_amax(w[:rows // 2].abs().max()).expand(rows // 2),
                           fp8.scale_from_amax(w[rows // 2:].abs().max()).expand(rows - rows // 2)]).cuda()
    else:
        scale = fp8.scale_from_amax(w.abs().max()).cuda()
    h = x.t() @ x
    eager = fp8.gptq_fp8(w, h, scale, cuda_graphs=False)
    graphed = fp8.gptq_fp8(w, h, scale, cuda_graphs=True)
    again = fp8.gptq_fp8(w * 1.0, h, scale, cuda_graphs=True)  # a replay of the captured graphs
    assert torch.equal(eager.view(torch.uint8), graphed.view(torch.uint8))
    assert torch.equal(eager.view(torch.uint8), again.view(torch.uint8))
    fp8.release_graphs()


def test_gpu_fp8_quantize_writes_the_same_checkpoint_with_and_without_graphs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSettings(samples=8, seq_len=64, token_ids=ids, device="cuda")
    out = {}
    for graphs in (False, True):
        monkeypatch.setattr(fp8, "GPTQ_CUDA_GRAPHS", graphs)
        s = quantize_checkpoint(tmp_path / "hf", tmp_path / f"q{graphs}", QuantConfig("FP8"), calibration=calib,
                                dtype="bfloat16")
        out[graphs] = (tmp_path / f"q{graphs}" / "rank0.safetensors").read_bytes()
        assert s.timings["quantize_s"] > 0
    assert out[False] == out[True]

"""``engine.weights.load_weights``: the engine's parallel safetensors reader gives exactly what
``safetensors.torch.load_file`` gives (every dtype, odd byte counts, empty and 0-dim tensors, tensors split
across many pieces and threads), and refuses a damaged file before reading any tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.compiler.engine.weights import load_weights
from service.compiler.errors import MalformedWeights


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),  # 30 bytes: the next tensor starts unaligned
        "b.f32": torch.randn(7, 11, generator=g),
        "c.i8": torch.randint(-128, 127, (13, 3), generator=g, dtype=torch.int8),
        "d.empty": torch.zeros(0, 4, dtype=torch.float16),
        "e.scalar": torch.tensor(2.5, dtype=torch.float16),
        "f.u8": torch.randint(0, 255, (1001,), generator=g, dtype=torch.uint8),
        "g.i32": torch.randint(-1000, 1000, (5, 9), generator=g, dtype=torch.int32),
        "h.f8": torch.randn(6, 6, generator=g).to(torch.float8_e4m3fn),
    }


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], device: str) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        t = got[name]
        assert t.device.type == device and t.dtype == w.dtype and t.shape == w.shape, name
        assert torch.equal(t.cpu().reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("chunk,threads", [(16, 3), (7, 8), (1 << 20, 1)])
def test_reads_what_load_file_reads(tmp_path, chunk, threads):
    path = tmp_path / "rank0.safetensors"
    save_file(_tensors(), str(path))
    _same(load_weights(path, "cpu", threads=threads, chunk=chunk), load_file(str(path)), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("chunk,threads", [(16, 3), (1 << 20, 8)])
def test_reads_what_load_file_reads_on_the_gpu(tmp_path, chunk, threads):
    path = tmp_path / "rank0.safetensors"
    save_file(_tensors(), str(path))
    _same(load_weights(path, "cuda", threads=threads, chunk=chunk), load_file(str(path)), "cuda")


def test_damaged_files_are_refused(tmp_path):
    path = tmp_path / "rank0.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(path))
    raw = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:-4])  # truncated data
    with pytest.raises(MalformedWeights, match="past the end|not described"):
        load_weights(tmp_path / "short.safetensors", "cpu")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
                         "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}).encode()
    (tmp_path / "overlap.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(MalformedWeights, match="overlaps"):
        load_weights(tmp_path / "overlap.safetensors", "cpu")

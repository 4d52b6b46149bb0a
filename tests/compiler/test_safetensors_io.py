"""safetensors header validation, case by case, and the offset-addressed writer."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from service.compiler.checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter, read_header
from service.compiler.errors import MalformedWeights


def _file(tmp_path, header, data: bytes = b"", raw: bytes | None = None):
    body = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return p


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]}}


@pytest.mark.parametrize("header,data,raw,needle", [
    (None, b"", b"", "not start with"),                                           # empty header
    (None, b"", b"[1,2]", "not start with"),
    (None, b"", b"{not json", "not valid JSON"),
    (None, b"", b'{"a":1,"a":2}', "twice"),
    (None, b"", b"\xff\xfe{", "UTF-8"),
    ({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), None, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), None, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4), None, "needs 8"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), None, "invalid data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), None, "past the end"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), None, "gap of 4 bytes"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), None, "after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), None, "overlaps"),
    ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
])
def test_malformed_headers_are_refused_with_the_file_named(tmp_path, header, data, raw, needle):
    p = _file(tmp_path, header, data, raw)
    with pytest.raises(MalformedWeights) as info:
        read_header(p)
    assert needle in str(info.value) and "x.safetensors" in str(info.value)


def test_too_small_and_oversized(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(MalformedWeights, match="too small"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(MalformedWeights, match="exceeds"):
        read_header(p)


def test_zero_copy_views_and_release(tmp_path):
    data = torch.arange(2, dtype=torch.float32).numpy().tobytes() + torch.ones(2, 2, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    p = _file(tmp_path, GOOD, data)
    with SafetensorsFile(p) as f:
        assert f.tensor("a").tolist() == [0.0, 1.0]
        assert f.tensor("b").dtype == torch.bfloat16 and f.tensor("b").sum().item() == 4
        f.release_tensor("b")  # dropping mapped pages must not change what is read next
        assert f.tensor("b").sum().item() == 4


def test_writer_chunks_at_offsets_from_any_order(tmp_path):
    p = tmp_path / "w.safetensors"
    t = torch.randn(6, 4)
    with SafetensorsWriter(p, [("t", "F32", (6, 4)), ("u", "I8", (3,))], metadata={"producer": "test"}) as w:
        w.write("t", 3 * 16, t[3:])
        w.write("u", 0, torch.tensor([1, -2, 3], dtype=torch.int8))
        w.write("t", 0, t[:3])
        with pytest.raises(ValueError):
            w.write("u", 2, torch.tensor([1, 2], dtype=torch.int8))
    out = load_file(str(p))
    assert torch.equal(out["t"], t) and out["u"].tolist() == [1, -2, 3]
    infos, meta = read_header(p)
    assert meta == {"producer": "test"} and (infos["t"].start - 8) % 8 == 0

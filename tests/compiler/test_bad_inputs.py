"""Bad input: each case fails with a typed error whose message names the culprit, before any output
directory (or temp directory) exists."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from service.compiler import Mapping, convert_checkpoint
from service.compiler.errors import (
    InvalidMapping,
    MalformedWeights,
    ModelNotFound,
    UnsafeWeights,
    UnsupportedArchitecture,
    WeightsMismatch,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=3, vocab_size=64)
    d = tmp_path_factory.mktemp("good")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


def _copy(good, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(good, d)
    return d


def _assert_fails(src, tmp_path, exc_type, *needles, **kw):
    out = tmp_path / "out"
    with pytest.raises(exc_type) as info:
        convert_checkpoint(src, out, dtype="float32", **kw)
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temp dir left behind"
    return info.value


def test_unsupported_architecture(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    err = _assert_fails(d, tmp_path, UnsupportedArchitecture, "FalconForCausalLM")
    assert "LlamaForCausalLM" in err.hint and err.code == "unsupported_architecture"


def test_missing_shard_named_in_index(good, tmp_path):
    d = _copy(good, tmp_path)
    names = json.loads((d / "config.json").read_text())  # noqa: F841 - config stays valid
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    index = {"weight_map": {k: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
                            for i, k in enumerate(keys)}}
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_fails(d, tmp_path, WeightsMismatch, "model-00002-of-00002.safetensors", "missing")


def test_truncated_safetensors(good, tmp_path):
    d = _copy(good, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    _assert_fails(d, tmp_path, MalformedWeights, "model.safetensors", "past the end")


def test_oversized_header(good, tmp_path):
    d = _copy(good, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 200_000_000) + data[8:])
    _assert_fails(d, tmp_path, MalformedWeights, "model.safetensors", "exceeds")


def test_overlapping_offsets(tmp_path, good):
    d = _copy(good, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    # point the second tensor at the first one's bytes (same length keeps the sizes consistent)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    (_, v0), (_, v1) = entries[0], entries[1]
    v1["data_offsets"] = [v0["data_offsets"][0] + 4, v0["data_offsets"][0] + 4 + (v1["data_offsets"][1] - v1["data_offsets"][0])]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    assert len(raw) == n
    f.write_bytes(data[:8] + raw + data[8 + n:])
    _assert_fails(d, tmp_path, MalformedWeights, "model.safetensors", "overlaps")


def test_pickle_only_repo_refused_and_allowed_explicitly(good, tmp_path):
    d = _copy(good, tmp_path)
    from safetensors.torch import load_file

    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    err = _assert_fails(d, tmp_path, UnsafeWeights, "pickle")
    assert "--allow-pickle" in err.hint
    # explicitly allowed: loaded with torch.load(weights_only=True)
    out = tmp_path / "ok"
    convert_checkpoint(d, out, dtype="float32", allow_pickle=True)
    assert (out / "rank0.safetensors").exists()


def test_pickle_with_code_is_refused_even_when_allowed(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").unlink()
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    _assert_fails(d, tmp_path, UnsafeWeights, "weights-only", allow_pickle=True)
    assert not canary.exists()


def test_config_weights_shape_mismatch(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the weights hold 64
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_fails(d, tmp_path, WeightsMismatch, "mlp.fc.weight", "[64, 48]", "[96, 48]")


def test_tp_not_dividing_heads(good, tmp_path):
    err = _assert_fails(good, tmp_path, InvalidMapping, "num_attention_heads=6", "tp_size=4",
                        mapping=Mapping(tp_size=4))
    assert err.code == "invalid_mapping"


def test_pp_not_dividing_layers(good, tmp_path):
    _assert_fails(good, tmp_path, InvalidMapping, "num_hidden_layers=3", "pp_size=2", mapping=Mapping(pp_size=2))


def test_missing_tensor_named(good, tmp_path):
    d = _copy(good, tmp_path)
    from safetensors.torch import load_file

    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    _assert_fails(d, tmp_path, WeightsMismatch, "model.layers.1.self_attn.k_proj.weight")


def test_index_path_traversal_refused(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    _assert_fails(d, tmp_path, UnsafeWeights, "escapes")


def test_missing_folder(tmp_path):
    _assert_fails(tmp_path / "nope", tmp_path, ModelNotFound, "nope")


def test_existing_output_is_not_touched(good, tmp_path):
    from service.compiler.errors import OutputExists

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputExists):
        convert_checkpoint(good, out, dtype="float32")
    assert (out / "keep").read_text() == "x"


def _shard(good, d):
    from safetensors.torch import load_file

    sd = load_file(str(good / "model.safetensors"))
    names = sorted(sd)
    d.mkdir()
    (d / "config.json").write_text((good / "config.json").read_text())
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_model_from_hf_cache_converts(good, tmp_path):
    """HF cache snapshots are symlinks into the repo's blobs/ folder: allowed, nothing else is."""
    from service.compiler.sources.hub import resolve_model_dir
    from service.compiler.sources.smollm2 import install_into_hf_cache

    _shard(good, tmp_path / "sharded")
    install_into_hf_cache(tmp_path / "sharded", tmp_path / "cache", repo_id="acme/sharded")
    snap = resolve_model_dir("acme/sharded", cache_dir=tmp_path / "cache", allow_download=False, repo_only=True)
    assert (snap / "model-00001-of-00002.safetensors").is_symlink()
    convert_checkpoint(snap, tmp_path / "out", dtype="float32")
    assert (tmp_path / "out" / "rank0.safetensors").exists()


def test_symlinked_shard_pointing_outside_is_refused(good, tmp_path):
    _shard(good, tmp_path / "m")
    outside = tmp_path / "elsewhere.safetensors"
    (tmp_path / "m" / "model-00002-of-00002.safetensors").rename(outside)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").symlink_to(outside)
    _assert_fails(tmp_path / "m", tmp_path, UnsafeWeights, "resolves outside")

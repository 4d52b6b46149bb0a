"""The torch-free convert path (no cast needed: bytes only) writes exactly what the torch path writes,
and ``kiln convert`` on it never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from service.compiler import Mapping, convert_checkpoint, from_hugging_face
from service.compiler import convert as convert_mod

ROOT = Path(__file__).resolve().parents[2]


def _llama_config(tied: bool, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 101, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": tied, "torch_dtype": dtype,
    }


def _llama_tensors(cfg: dict, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    H, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    sd = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": r(H)}
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = r(V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": r(H), p + "post_attention_layernorm.weight": r(H),
            p + "self_attn.q_proj.weight": r(H, H), p + "self_attn.k_proj.weight": r(kv, H),
            p + "self_attn.v_proj.weight": r(kv, H), p + "self_attn.o_proj.weight": r(H, H),
            p + "mlp.gate_proj.weight": r(inter, H), p + "mlp.up_proj.weight": r(inter, H),
            p + "mlp.down_proj.weight": r(H, inter),
        }
    return sd


def _write_model(d: Path, cfg: dict, sd: dict[str, torch.Tensor], shards: int = 1) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    names = list(sd)
    if shards == 1:
        save_file(sd, str(d / "model.safetensors"))
        return d
    weight_map = {}
    per = -(-len(names) // shards)
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(d / fname))
        weight_map |= dict.fromkeys(part, fname)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torchfree")
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key, tied, dt, tdt, shards in (("tied_bf16", True, "bfloat16", torch.bfloat16, 1),
                                       ("untied_bf16_sharded", False, "bfloat16", torch.bfloat16, 3),
                                       ("tied_f32", True, "float32", torch.float32, 1),
                                       ("untied_f16", False, "float16", torch.float16, 1)):
        cfg = _llama_config(tied, dt)
        out[key] = _write_model(root / key, cfg, _llama_tensors(cfg, tdt, gen), shards)
    # GPT-2: Conv1D weights are read transposed, c_attn is pre-fused
    H, nh, L, V, P = 32, 4, 2, 53, 40
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": H, "n_head": nh, "n_layer": L,
           "vocab_size": V, "n_positions": P, "torch_dtype": "bfloat16"}

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    sd = {"transformer.wte.weight": r(V, H), "transformer.wpe.weight": r(P, H),
          "transformer.ln_f.weight": r(H), "transformer.ln_f.bias": r(H)}
    for i in range(L):
        h = f"transformer.h.{i}."
        sd |= {h + "ln_1.weight": r(H), h + "ln_1.bias": r(H), h + "ln_2.weight": r(H), h + "ln_2.bias": r(H),
               h + "attn.c_attn.weight": r(H, 3 * H), h + "attn.c_attn.bias": r(3 * H),
               h + "attn.c_proj.weight": r(H, H), h + "attn.c_proj.bias": r(H),
               h + "mlp.c_fc.weight": r(H, 4 * H), h + "mlp.c_fc.bias": r(4 * H),
               h + "mlp.c_proj.weight": r(4 * H, H), h + "mlp.c_proj.bias": r(H)}
    out["gpt2_bf16"] = _write_model(root / "gpt2_bf16", cfg, sd)
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _convert_both(src: Path, tmp_path: Path, dtype: str, tp: int, pp: int, tag: str = "") -> tuple[Path, Path]:
    slow, fast = tmp_path / f"torch{tag}", tmp_path / f"raw{tag}"
    mapping = Mapping(tp_size=tp, pp_size=pp)
    a = convert_checkpoint(src, slow, dtype=dtype, mapping=mapping, torch_free=False)
    b = convert_checkpoint(src, fast, dtype=dtype, mapping=mapping, torch_free=True)
    assert (a.tensors, a.bytes, a.dtype) == (b.tensors, b.bytes, b.dtype)
    assert not a.torch_free
    return slow, fast


@pytest.mark.parametrize("key,dtype", [("tied_bf16", "bfloat16"), ("untied_bf16_sharded", "bfloat16"),
                                       ("tied_f32", "float32"), ("untied_f16", "auto"), ("gpt2_bf16", "auto")])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_torch_free_output_is_byte_identical(models, tmp_path, key, dtype, tp, pp):
    src = models[key]
    model = from_hugging_face(src, dtype=dtype, mapping=Mapping(tp_size=tp, pp_size=pp), torch_free=True)
    try:
        assert model.torch_free  # no cast: the raw plan is kept
    finally:
        model.close()
    slow, fast = _convert_both(src, tmp_path, dtype, tp, pp)
    a, b = _files(slow), _files(fast)
    assert list(a) == list(b) == ["config.json"] + [f"rank{r}.safetensors" for r in range(tp * pp)]
    for name in a:
        assert a[name] == b[name], f"{key} tp={tp} pp={pp}: {name} differs"


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_small_chunks_and_mmap_route_stay_identical(models, tmp_path, monkeypatch, kernel_copy):
    """Many chunks per piece, and verbatim pieces through the memory map instead of copy_file_range."""
    monkeypatch.setattr(convert_mod, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(convert_mod, "KERNEL_COPY", kernel_copy)
    for key in ("untied_bf16_sharded", "gpt2_bf16"):
        slow, fast = _convert_both(models[key], tmp_path, "auto", 2, 1, tag=key)
        assert _files(slow) == _files(fast)


def test_cast_falls_back_to_torch_with_same_output(models, tmp_path):
    src = models["tied_f32"]
    model = from_hugging_face(src, dtype="bfloat16", mapping=Mapping(tp_size=2), torch_free=True)
    try:
        assert not model.torch_free  # f32 -> bf16 needs a cast: re-planned over the torch source
        assert all(isinstance(p.dtype, torch.dtype) for p in model.plans(0))
    finally:
        model.close()
    slow, fast = _convert_both(src, tmp_path, "bfloat16", 2, 1)
    assert _files(slow) == _files(fast)


def test_in_memory_tensors_of_a_raw_model_match(models):
    src = models["untied_f16"]
    raw = from_hugging_face(src, mapping=Mapping(tp_size=2), torch_free=True)
    ref = from_hugging_face(src, mapping=Mapping(tp_size=2))
    try:
        assert raw.torch_free and not ref.torch_free
        for rank in (0, 1):
            got, want = dict(raw.tensors(rank)), dict(ref.tensors(rank))
            assert list(got) == list(want)
            for name in got:
                assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    finally:
        raw.close()
        ref.close()


def _messages(exc: type, src: Path, out: Path, **kw) -> list[str]:
    """The error of the torch route and of the torch-free route, in that order."""
    msgs = []
    for torch_free in (False, True):
        with pytest.raises(exc) as info:
            convert_checkpoint(src, out, torch_free=torch_free, **kw)
        msgs.append(str(info.value))
    return msgs


def test_validation_errors_are_the_same_on_both_routes(models, tmp_path):
    from service.compiler.errors import InvalidMapping, MalformedWeights, WeightsMismatch

    src = models["tied_bf16"]
    for mapping in (Mapping(tp_size=3), Mapping(pp_size=3)):
        msgs = _messages(InvalidMapping, src, tmp_path / "x", mapping=mapping)
        assert msgs[0] == msgs[1]
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 128}))
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    msgs = _messages(WeightsMismatch, bad, tmp_path / "y")
    assert msgs[0] == msgs[1] and "shape mismatch" in msgs[0]
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text((src / "config.json").read_text())
    (trunc / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-10])
    msgs = _messages(MalformedWeights, trunc, tmp_path / "z")
    assert msgs[0] == msgs[1] and "model.safetensors" in msgs[0]
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


CHILD = """
import json, sys
from service.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""


def _cli(args: list[str]) -> tuple[dict, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_cli_fast_path_never_imports_torch(models, tmp_path, tp, pp):
    src = models["untied_bf16_sharded"]
    out = tmp_path / "cli"
    got, printed = _cli(["convert", str(src), str(out), "--dtype", "bfloat16", "--tp-size", str(tp), "--pp-size",
                         str(pp), "--quiet", "--json"])
    assert got == {"rc": 0, "torch": []}
    assert json.loads(printed[-1])["torch_free"] is True
    ref = tmp_path / "ref"
    convert_checkpoint(src, ref, dtype="bfloat16", mapping=Mapping(tp_size=tp, pp_size=pp), torch_free=False)
    assert _files(out) == _files(ref)


def test_cli_with_a_cast_still_uses_torch(models, tmp_path):
    got, _ = _cli(["convert", str(models["tied_f32"]), str(tmp_path / "c"), "--dtype", "bfloat16", "--quiet",
                   "--json"])
    assert got["rc"] == 0 and "torch" in got["torch"]

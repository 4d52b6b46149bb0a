"""Quantizer on tiny random Llama / Qwen2 / GPT-2 / OPT models built with transformers in the test.

Every algo: quantize, ``validate_checkpoint``, reload and execute from the stored low-precision
tensors; dequantized weights within each algo's error bound of the float weights; int4 packing
round-trips bit-exactly; refusals happen before any file is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from service.compiler.checkpoint.validate import validate_checkpoint  # noqa: E402
from service.compiler.convert import from_hugging_face  # noqa: E402
from service.compiler.errors import InvalidArgument, OutputExists, UnsupportedArchitecture  # noqa: E402
from service.compiler.quantization import (  # noqa: E402
    CalibrationSettings,
    QuantConfig,
    dequantize_weight,
    qlinear,
    quantize_checkpoint,
)
from service.compiler.quantization import config as qc  # noqa: E402
from service.compiler.quantization.layout import linear_module  # noqa: E402
from service.compiler.quantization.report import CheckpointRunner  # noqa: E402
from service.compiler.quantization.weight_only import (  # noqa: E402
    pack_int4_cols,
    pack_int4_rows,
    unpack_int4_cols,
    unpack_int4_rows,
)

VOCAB = 128
IDS = torch.randint(0, VOCAB, (10, 24), generator=torch.Generator().manual_seed(0))


def _build(kind: str, root: Path) -> Path:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=64, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.OPTConfig(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=64, word_embed_proj_dim=128, **common)
        model = transformers.OPTForCausalLM(cfg)
    with torch.no_grad():  # give activations a few outlier channels, as real models have
        for name, p in model.named_parameters():
            if name.endswith(("input_layernorm.weight", "ln_1.weight", "self_attn_layer_norm.weight")):
                p[:4] *= 8.0
    out = root / kind
    model.eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-models")
    return {k: _build(k, root) for k in ("llama", "qwen2", "gpt2", "opt")}


@pytest.fixture(scope="module")
def float_tensors(models) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for k, d in models.items():
        m = from_hugging_face(d, dtype="float32")
        out[k] = dict(m.tensors(0))
        m.close()
    return out


def _calib(**kw) -> CalibrationSettings:
    return CalibrationSettings(samples=8, seq_len=24, heldout_samples=2, awq_tokens=128, token_ids=IDS, **kw)


# --- packing and config ------------------------------------------------------------------------------


def test_int4_packing_round_trips_bit_exactly_with_even_row_in_low_nibble():
    q = torch.randint(-8, 8, (64, 48), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    rows = pack_int4_rows(q)
    assert rows.shape == (32, 48) and rows.dtype == torch.int8
    assert torch.equal(unpack_int4_rows(rows), q)
    b = rows.view(torch.uint8)
    assert torch.equal((b & 0x0F).to(torch.int16), (q[0::2].to(torch.int16) & 0x0F))  # even row: low nibble
    assert torch.equal((b >> 4).to(torch.int16), (q[1::2].to(torch.int16) & 0x0F))
    cols = pack_int4_cols(q.t().contiguous())
    assert cols.shape == (48, 32) and torch.equal(cols, rows.t())
    assert torch.equal(unpack_int4_cols(cols), q.t())
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(2).reshape(32, 1)  # every nibble value
    assert torch.equal(unpack_int4_rows(pack_int4_rows(every)), every)


def test_exclude_modules_are_added_to_the_trtllm_defaults():
    cfg = QuantConfig("int4_awq", exclude_modules=["*layers.0.mlp.proj"])
    d = cfg.to_checkpoint_dict()
    assert d["quant_algo"] == "W4A16_AWQ" and d["pre_quant_scale"] is True and d["group_size"] == 128
    assert d["exclude_modules"][:6] == list(qc.DEFAULT_EXCLUDES) and "*layers.0.mlp.proj" in d["exclude_modules"]
    assert cfg.is_excluded("lm_head") and cfg.is_excluded("transformer.vocab_embedding")
    assert cfg.is_excluded("transformer.layers.0.mlp.proj") and not cfg.is_excluded("transformer.layers.1.mlp.proj")
    assert QuantConfig.from_checkpoint_dict(d).excludes == cfg.excludes


# --- every algo on every architecture ----------------------------------------------------------------

CASES = [("FP8", "FP8"), ("FP8_PER_CHANNEL_PER_TOKEN", None), ("W8A16", None), ("W4A16", "INT8"),
         ("W4A16_AWQ", None), ("W8A8_SQ_PER_CHANNEL", "INT8"), ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", None)]
# FP8's GPTQ rounding trades weight-space error for output error on the calibration inputs (192 tokens
# here, fewer than the MLP's input features, so H is rank-deficient): its weights are further from W.
REL_BOUND = {"FP8": 0.1, "FP8_PER_CHANNEL_PER_TOKEN": 0.04, "W8A16": 0.01, "W4A16": 0.2, "W4A16_AWQ": 0.2,
             "W8A8_SQ_PER_CHANNEL": 0.05, "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": 0.05}
FOLDED_NORM = {"attention.qkv": "input_layernorm", "mlp.fc": "post_layernorm", "mlp.gate": "post_layernorm"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
@pytest.mark.parametrize("algo,kv", CASES)
def test_quantize_validate_reload_and_bound(models, float_tensors, tmp_path, arch, algo, kv):
    cfg = QuantConfig(algo, kv_cache_quant_algo=kv, group_size=64, alpha_grid=(0.5, 0.8, 1.0), awq_grid=5)
    out = tmp_path / "q"
    summary = quantize_checkpoint(models[arch], out, cfg, calibration=_calib(), dtype="float32")
    report = validate_checkpoint(out, strict=True)
    assert report.ok, report.errors
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == algo and config["quantization"]["kv_cache_quant_algo"] == kv
    if cfg.needs_calibration:
        assert config["kiln_quantization"]["calibration"]["samples"] == 8
    runner = CheckpointRunner.from_dir(out)
    ref = float_tensors[arch]
    quant = config["quantization"]
    n_quantized = 0
    for name, w in ref.items():
        module = linear_module(name, tuple(w.shape))
        if module is None:
            continue
        layer, local = name.split(".")[2], module.split(".", 3)[3]
        t = runner.layers[int(layer)]
        assert t[local + ".weight"].dtype in (torch.int8, torch.float8_e4m3fn)
        deq = dequantize_weight(t, local, quant)
        if algo == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN" and local in FOLDED_NORM:  # smoothing lives in the norm
            norm = FOLDED_NORM[local] + ".weight"
            deq = deq * (t[norm].float() / ref[f"transformer.layers.{layer}.{norm}"].float())[None, :]
        rel = float((deq - w).norm() / w.norm())
        assert rel < REL_BOUND[algo], (name, rel)
        if algo in ("W8A16", "W4A16"):  # round-to-nearest: every element within half a step
            step = t[local + ".per_channel_scale"].float()[:, None]
            assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())
        x = torch.randn(3, w.shape[1])
        y = qlinear(x, t, local, quant)
        assert y.shape == (3, w.shape[0]) and torch.isfinite(y).all()
        n_quantized += 1
    assert n_quantized >= 8
    if kv:
        scales = [float(t["attention.kv_cache_scaling_factor"]) for t in runner.layers.values()]
        assert all(0 < s != 1.0 for s in scales)
    logits = runner.logits(IDS[:2])
    ref_logits = CheckpointRunner(config | {"quantization": {}}, ref).logits(IDS[:2])
    agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    assert agree > 0.5, agree
    assert summary.out_dir == str(out.absolute())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_float_runner_matches_transformers(models, float_tensors, arch):
    hf = transformers.AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(IDS[:2]).logits
    config = json.loads(json.dumps(from_hugging_face(models[arch], dtype="float32").config))
    got = CheckpointRunner(config, float_tensors[arch]).logits(IDS[:2])
    assert torch.allclose(got, expected, atol=2e-4, rtol=1e-4), float((got - expected).abs().max())


def test_gptq_fp8_beats_round_to_nearest_on_held_out_inputs():
    from service.compiler.quantization.fp8 import gptq_fp8, output_error, scale_from_amax, to_fp8

    g = torch.Generator().manual_seed(3)
    mix = torch.randn(64, 64, generator=g) * torch.logspace(0, -2, 64)[None, :]  # correlated, uneven inputs
    x_cal, x_test = torch.randn(4096, 64, generator=g) @ mix, torch.randn(4096, 64, generator=g) @ mix
    x_cal[:, 5] = 0.0  # an input never active in calibration
    w = torch.randn(48, 64, generator=g) * 0.05
    scale = scale_from_amax(w.abs().max())
    codes = gptq_fp8(w, x_cal.t() @ x_cal, scale)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == w.shape
    rtn = to_fp8(w, scale).float() * scale
    assert torch.equal(codes[:, 5].float() * scale, rtn[:, 5])  # never active in calibration: round to nearest
    gq = codes.float() * scale
    h_test = x_test.t() @ x_test
    assert output_error(w, gq, h_test) < 0.7 * output_error(w, rtn, h_test)
    # row-stacked tensors with their own scales (fc + gate): the same as rounding each on its own
    w2 = torch.randn(16, 64, generator=g)
    s2 = scale_from_amax(w2.abs().max())
    both = gptq_fp8(torch.cat([w, w2]), x_cal.t() @ x_cal, torch.cat([scale.expand(48), s2.expand(16)]))
    assert torch.equal(both[:48].float(), codes.float())
    assert torch.equal(both[48:].float(), gptq_fp8(w2, x_cal.t() @ x_cal, s2).float())
    with pytest.raises(ValueError, match="H \\[in, in\\]"):
        gptq_fp8(w, torch.eye(63), scale)


def test_fp8_gptq_is_default_and_max_calibration_is_round_to_nearest(models, float_tensors, tmp_path):
    from service.compiler.quantization.fp8 import quantize_per_tensor

    ref = float_tensors["llama"]
    for gptq in (True, False):
        out = tmp_path / f"fp8-{gptq}"
        cfg = QuantConfig("FP8") if gptq else QuantConfig("FP8", fp8_gptq=False)
        summary = quantize_checkpoint(models["llama"], out, cfg, calibration=_calib(), dtype="float32")
        assert validate_checkpoint(out, strict=True).ok
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # spool removed
        t = CheckpointRunner.from_dir(out).layers[1]
        w8, s = quantize_per_tensor(ref["transformer.layers.1.mlp.proj.weight"])
        assert torch.equal(t["mlp.proj.weights_scaling_factor"], s)  # the scale is amax / 448 either way
        assert t["mlp.proj.weight"].dtype == torch.float8_e4m3fn and t["mlp.proj.weight"].shape == w8.shape
        same = torch.equal(t["mlp.proj.weight"].float(), w8.float())
        rec = summary.record
        if gptq:
            assert not same and rec["fp8_weight_rounding"].startswith("gptq")
            assert 0.0 < rec["fp8_gptq_mean_loss_vs_rtn"] < 1.0
        else:
            assert same and rec["fp8_weight_rounding"].startswith("round to nearest")
            assert "fp8_gptq_mean_loss_vs_rtn" not in rec


def test_kv_cache_scale_is_calibrated_amax(models, tmp_path):
    out = tmp_path / "kv"
    quantize_checkpoint(models["llama"], out, QuantConfig(kv_cache_quant_algo="INT8"), calibration=_calib(),
                        dtype="float32")
    assert validate_checkpoint(out, strict=True).ok
    runner = CheckpointRunner.from_dir(out)
    seen = [0.0]

    def kv(k, v):
        seen[0] = max(seen[0], float(k.abs().max()), float(v.abs().max()))
        return k, v

    t0 = runner.layers[0]
    runner.dec.layer(t0, runner.dec.embed(runner.globals, IDS[:8]), kv=kv)
    ratio = json.loads((out / "config.json").read_text())["kiln_quantization"]["int8_kv_clip_ratios"][0]
    assert 0.5 <= ratio <= 1.0  # searched clip of the shared K/V scale (attention-output error)
    assert float(t0["attention.kv_cache_scaling_factor"]) == pytest.approx(ratio * seen[0] / 127, rel=1e-5)


def test_awq_zero_point_and_exclusions(models, tmp_path):
    out = tmp_path / "awqz"
    cfg = QuantConfig("W4A16_AWQ", has_zero_point=True, group_size=64, awq_grid=4,
                      exclude_modules=["*layers.1.mlp.proj"])
    quantize_checkpoint(models["llama"], out, cfg, calibration=_calib(), dtype="float32")
    assert validate_checkpoint(out, strict=True).ok
    runner = CheckpointRunner.from_dir(out)
    assert runner.layers[0]["mlp.proj.zero"].shape == (128, 256 // 64)
    assert runner.layers[1]["mlp.proj.weight"].dtype == torch.float32  # excluded: stays float
    assert "mlp.proj.zero" not in runner.layers[1]


def test_validate_catches_a_layout_that_does_not_match_quant_algo(models, tmp_path):
    out = tmp_path / "fp8"
    quantize_checkpoint(models["gpt2"], out, QuantConfig("FP8"), calibration=_calib(), dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization"]["quant_algo"] = "W8A16"
    (out / "config.json").write_text(json.dumps(cfg))
    report = validate_checkpoint(out)
    assert not report.ok and any("per_channel_scale" in e for e in report.errors)


# --- refusals before any file is written --------------------------------------------------------------


@pytest.mark.parametrize("kwargs,target,error,match", [
    ({"quant_algo": "FP8"}, "sm_80", InvalidArgument, "compute capability >= 8.9"),
    ({"kv_cache_quant_algo": "FP8"}, "8.6", InvalidArgument, "FP8 KV cache"),
    ({"quant_algo": "W4A16_AWQ", "group_size": 96}, None, InvalidArgument, "does not divide the 128 input"),
    ({}, None, InvalidArgument, "no quantization requested"),
])
def test_bad_combinations_fail_before_writing(models, tmp_path, kwargs, target, error, match):
    out = tmp_path / "never"
    with pytest.raises(error, match=match):
        quantize_checkpoint(models["llama"], out, QuantConfig(**kwargs), calibration=_calib(), target_sm=target,
                            dtype="float32")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_config_errors_and_nemotron_nas_refusals(models, tmp_path):
    with pytest.raises(InvalidArgument, match="unknown quantization algorithm"):
        QuantConfig("INT3")
    with pytest.raises(InvalidArgument, match="has_zero_point"):
        QuantConfig("FP8", has_zero_point=True)
    for algo in ("W8A16", "W4A16", "W8A8_SQ_PER_CHANNEL"):
        with pytest.raises(InvalidArgument, match="Nemotron-NAS"):
            qc.check_combination(QuantConfig(algo), "DeciLMForCausalLM", 90)
    qc.check_combination(QuantConfig("FP8"), "DeciLMForCausalLM", 90)  # allowed by TensorRT-LLM
    assert qc.parse_sm("sm_89") == 89 and qc.parse_sm("9.0") == 90 and qc.parse_sm(8) == 80
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExists):
        quantize_checkpoint(models["llama"], tmp_path / "exists", QuantConfig("W8A16"), dtype="float32")
    with pytest.raises(InvalidArgument, match="tokenizer"):  # calibrated algo, no tokenizer, no ids
        quantize_checkpoint(models["llama"], tmp_path / "x", QuantConfig("FP8"), dtype="float32")
    assert not (tmp_path / "x").exists()
    _ = UnsupportedArchitecture


@pytest.mark.parametrize("arch,algo,kv", [("llama", "W4A16_AWQ", "INT8"), ("qwen2", "FP8", "FP8"),
                                          ("gpt2", "W8A8_SQ_PER_CHANNEL", None), ("opt", "W8A16", "INT8"),
                                          ("llama", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", None)])
def test_reference_runtime_executes_quantized_checkpoints(models, tmp_path, arch, algo, kv):
    from service.compiler.reference.model import ReferenceModel

    out = tmp_path / "q"
    quantize_checkpoint(models[arch], out, QuantConfig(algo, kv_cache_quant_algo=kv, group_size=64, awq_grid=4,
                                                       alpha_grid=(0.8,)), calibration=_calib(), dtype="float32")
    ref = ReferenceModel.from_checkpoint(out)
    assert ref.w["transformer.layers.0.attention.qkv.weight"].dtype != torch.float32  # low precision as stored
    expected = CheckpointRunner.from_dir(out).logits(IDS[:2])
    assert torch.allclose(ref.forward(IDS[:2]), expected, atol=1e-3, rtol=1e-3)
    prompt = IDS[0, :6].tolist()
    runner = CheckpointRunner.from_dir(out)
    assert ref.generate(prompt, 5)[-5:] == runner.generate(prompt, 5)  # the KV-cache path agrees


def test_cli_convert_with_quantization_flags(models, tmp_path, capsys):
    from service.cli import main

    out = tmp_path / "cli-w8"
    rc = main(["convert", str(models["llama"]), str(out), "--dtype", "float32", "--quantization", "int8_wo",
               "--exclude-modules", "*layers.1.*", "--quiet", "--json"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["quant_algo"] == "W8A16" and validate_checkpoint(out, strict=True).ok
    config = json.loads((out / "config.json").read_text())
    assert "*layers.1.*" in config["quantization"]["exclude_modules"] and "*lm_head" in config["quantization"]["exclude_modules"]
    bad = tmp_path / "cli-fp8"
    rc = main(["convert", str(models["llama"]), str(bad), "--quantization", "FP8", "--target-sm", "sm_86", "--quiet"])
    assert rc == 2 and "compute capability >= 8.9" in capsys.readouterr().err and not bad.exists()


def _with_word_tokenizer(hf_dir: Path, out: Path) -> Path:
    """A copy of ``hf_dir`` with a word-level tokenizer over the bundled calibration text (the model's
    ids), so ``kiln convert`` calibrates it through the CLI."""
    import re
    import shutil
    from collections import Counter

    import tokenizers

    from service.compiler.quantization.calibration import bundled_text

    shutil.copytree(hf_dir, out)
    words = Counter(re.findall(r"\w+|[^\w\s]+", bundled_text())).most_common(VOCAB - 1)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, **{w: i + 1 for i, (w, _) in enumerate(words)}},
                                                           unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(out)
    return out


def test_fp8_calibration_method_fast_path_through_the_cli_and_part_timings(models, tmp_path, capsys):
    """``--fast`` / ``--calibration-method max`` writes exactly what QuantConfig(fp8_gptq=False) writes, the
    default writes the GPTQ checkpoint, and the summary splits its time into load / calibration / quantize /
    write; the method is refused for other algorithms before anything is written."""
    from service.cli import main

    hf = _with_word_tokenizer(models["llama"], tmp_path / "hf")
    common = ["--dtype", "float32", "--calibration-samples", "4", "--calibration-seq-len", "16", "--quiet", "--json"]
    runs = {}
    for name, flags in (("fast", ["--fast"]), ("max", ["--calibration-method", "max"]), ("gptq", [])):
        rc = main(["convert", str(hf), str(tmp_path / name), "--quantization", "FP8", *flags, *common])
        assert rc == 0, capsys.readouterr().err
        runs[name] = json.loads(capsys.readouterr().out)
    calib = CalibrationSettings(samples=4, seq_len=16)
    for name, cfg in (("api-max", QuantConfig("FP8", fp8_gptq=False)), ("api-gptq", QuantConfig("FP8"))):
        quantize_checkpoint(hf, tmp_path / name, cfg, calibration=calib, dtype="float32")
    data = {n: (tmp_path / n / "rank0.safetensors").read_bytes() for n in ("fast", "max", "gptq", "api-max", "api-gptq")}
    assert data["fast"] == data["max"] == data["api-max"] and data["gptq"] == data["api-gptq"] != data["max"]
    assert runs["fast"]["record"]["fp8_weight_rounding"].startswith("round to nearest")
    assert runs["gptq"]["record"]["fp8_weight_rounding"].startswith("gptq")
    for r in runs.values():
        t = r["timings"]
        parts = [t[k] for k in ("load_s", "calibration_s", "quantize_s", "write_s", "other_s")]
        assert min(parts) >= 0.0 and t["calibration_s"] > 0.0 and t["write_s"] > 0.0 and t["quantize_s"] > 0.0
        assert sum(parts) == pytest.approx(t["total_s"], abs=0.01) and t["total_s"] <= r["seconds"] + 1e-6
    rc = main(["convert", str(hf), str(tmp_path / "no"), "--quantization", "W8A16", "--fast", "--quiet"])
    assert rc == 2 and "applies to FP8 only" in capsys.readouterr().err and not (tmp_path / "no").exists()
    rc = main(["convert", str(hf), str(tmp_path / "no"), "--quantization", "FP8", "--fast",
               "--calibration-method", "gptq", "--quiet"])
    assert rc == 2 and "--fast is --calibration-method max" in capsys.readouterr().err
    with pytest.raises(InvalidArgument, match="unknown calibration method"):
        QuantConfig("FP8", calibration_method="minmax")
    assert QuantConfig("FP8", calibration_method="MAX").fp8_gptq is False
    assert QuantConfig("FP8").fp8_calibration_method == "gptq" and QuantConfig("W8A16").fp8_calibration_method is None


def _modelopt_fp8_export(hf_dir: Path, out: Path, skip: str = "mlp.down_proj") -> None:
    """A ModelOpt ``export_hf_checkpoint``-style FP8 folder made from a float HF folder (per-module scales)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, out)
    sd = load_file(str(out / "model.safetensors"))
    new = {}
    for name, t in sd.items():
        proj = name.rsplit(".", 2)[-2] if name.endswith("_proj.weight") else None
        if proj is None or name.endswith(f"{skip}.weight") and ".layers.1." in name:
            new[name] = t
            continue
        scale = (t.abs().max() / 448).reshape(())
        new[name] = (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        base = name[: -len(".weight")]
        new[base + ".weight_scale"] = scale
        new[base + ".input_scale"] = torch.tensor(0.05 + 0.01 * len(new) % 7)
        if proj in ("k_proj", "v_proj"):
            new[base + (".k_scale" if proj == "k_proj" else ".v_scale")] = torch.tensor(0.02 if proj == "k_proj" else 0.03)
    save_file(new, str(out / "model.safetensors"))
    (out / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}))


def test_modelopt_fp8_export_imports_with_shared_qkv_scale(models, float_tensors, tmp_path):
    from service.compiler.quantization.modelopt_import import import_modelopt_export

    export = tmp_path / "modelopt"
    _modelopt_fp8_export(models["llama"], export)
    out = import_modelopt_export(export, tmp_path / "imported", dtype="float32")
    assert validate_checkpoint(out, strict=True).ok
    runner = CheckpointRunner.from_dir(out)
    t0, t1 = runner.layers[0], runner.layers[1]
    assert t0["attention.qkv.weight"].dtype == torch.float8_e4m3fn and t0["attention.qkv.weights_scaling_factor"].shape == (1,)
    assert float(t0["attention.kv_cache_scaling_factor"]) == pytest.approx(0.03)  # max(k_scale, v_scale)
    assert t1["mlp.proj.weight"].dtype == torch.float32  # left in 16 bits by the export -> excluded by name
    config = json.loads((out / "config.json").read_text())
    assert "transformer.layers.1.mlp.proj" in config["quantization"]["exclude_modules"]
    quant = config["quantization"]
    for local in ("attention.qkv", "mlp.fc", "mlp.proj"):
        w = float_tensors["llama"][f"transformer.layers.0.{local}.weight"]
        rel = float((dequantize_weight(t0, local, quant) - w).norm() / w.norm())
        assert rel < 0.05, (local, rel)
    with pytest.raises(InvalidArgument, match="not a ModelOpt HF export"):
        import_modelopt_export(models["llama"], tmp_path / "nope")


def test_accuracy_report_metrics_and_thresholds(models, float_tensors, tmp_path):
    from service.compiler.evaluate.rouge import rouge_l, rouge_n
    from service.compiler.quantization.report import Thresholds, compare

    assert rouge_n([1, 2, 3, 4], [1, 2, 3, 4], 1) == rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_n([1, 2, 3, 4], [4, 3, 2, 1], 1) == 1.0 and rouge_l([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(0.25)
    out = tmp_path / "w4"
    quantize_checkpoint(models["llama"], out, QuantConfig("W4A16"), dtype="float32")
    config = json.loads((out / "config.json").read_text())
    ref = CheckpointRunner(config | {"quantization": {}}, float_tensors["llama"])
    same = compare(ref, ref, IDS[:3], prompts=[IDS[0, :5].tolist()], max_new_tokens=4)
    assert same.passed and same.kl_divergence == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.recovery_pct == pytest.approx(100.0) and same.rouge_l == 1.0
    strict = Thresholds(max_perplexity_increase_pct=0.0, min_top1_agreement=1.0, max_kl_divergence=0.0)
    rep = compare(CheckpointRunner.from_dir(out), ref, IDS[:3], thresholds=strict)
    assert not rep.passed and any("KL" in f for f in rep.failures) and rep.to_dict()["passed"] is False
    assert rep.calibration["weight_layout"].startswith("row-major")


def test_progress_reports_calibration_and_writing(models, tmp_path):
    seen: list[tuple[float, str]] = []
    quantize_checkpoint(models["gpt2"], tmp_path / "p", QuantConfig("FP8"), calibration=_calib(), dtype="float32",
                        progress=lambda f, m: seen.append((f, m)))
    fracs = [f for f, _ in seen]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0
    # one pass: each layer is written as soon as it is calibrated
    assert any("calibrated and wrote layer 1/2" in m for _, m in seen) and any("layer 2/2" in m for _, m in seen)
    seen.clear()  # the SmoothQuant alpha search: calibrate every layer, then write in a second pass
    quantize_checkpoint(models["llama"], tmp_path / "sq", QuantConfig("W8A8_SQ_PER_CHANNEL", alpha_grid=(0.5, 1.0)),
                        calibration=_calib(), dtype="float32", progress=lambda f, m: seen.append((f, m)))
    fracs = [f for f, _ in seen]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0
    assert any("calibrated layer 2/2" in m for _, m in seen) and any("wrote layer 2/2" in m for _, m in seen)


def test_modelopt_awq_export_imports_and_dequantizes_to_the_exported_weights(models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from service.compiler.quantization.modelopt_import import import_modelopt_export
    from service.compiler.quantization.weight_only import dequantize_groupwise, quantize_groupwise

    export = tmp_path / "modelopt-awq"
    shutil.copytree(models["llama"], export)
    sd = load_file(str(export / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    effective = {}
    new = {}
    for name, t in sd.items():
        if not name.endswith("_proj.weight"):
            new[name] = t
            continue
        base = name[: -len(".weight")]
        attn = ".self_attn." in name and not name.endswith("o_proj.weight")
        key = base.rsplit(".", 1)[0] + ".qkv" if attn else base  # q/k/v share one (resmoothed) scale
        pqs = effective.setdefault(key + "#pqs", torch.rand(t.shape[1], generator=g) + 0.5)
        q, scale, _ = quantize_groupwise(t / pqs[None, :], 64, torch.float32)
        new[name] = pack_int4_rows(q)
        new[base + ".weight_scale"] = scale
        new[base + ".pre_quant_scale"] = pqs.clone()
        effective[name] = dequantize_groupwise(q, scale, None, 64) * pqs[None, :]
    save_file(new, str(export / "model.safetensors"))
    (export / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 64,
                         "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]}}))
    out = import_modelopt_export(export, tmp_path / "imported", dtype="float32")
    assert validate_checkpoint(out, strict=True).ok
    runner = CheckpointRunner.from_dir(out)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "W4A16_AWQ" and quant["group_size"] == 64
    t0 = runner.layers[0]
    qkv = torch.cat([effective[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.allclose(dequantize_weight(t0, "attention.qkv", quant), qkv, rtol=1e-5, atol=1e-6)
    assert torch.allclose(dequantize_weight(t0, "mlp.proj", quant), effective["model.layers.0.mlp.down_proj.weight"],
                          rtol=1e-5, atol=1e-6)


def test_report_runner_merges_tensor_parallel_float_checkpoints(models, float_tensors, tmp_path):
    from service.compiler.checkpoint.mapping import Mapping
    from service.compiler.convert import convert_checkpoint

    convert_checkpoint(models["qwen2"], tmp_path / "tp2", dtype="float32", mapping=Mapping(tp_size=2, pp_size=1))
    sharded = CheckpointRunner.from_dir(tmp_path / "tp2").logits(IDS[:2])
    config = json.loads((tmp_path / "tp2" / "config.json").read_text())
    whole = CheckpointRunner(config, float_tensors["qwen2"]).logits(IDS[:2])
    assert torch.allclose(sharded, whole, atol=1e-4)

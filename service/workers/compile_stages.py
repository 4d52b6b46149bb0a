"""quantize -> build -> evaluate: the compiler's later stages, registered into the pipeline.

    fetch -> convert -> quantize (quantization asked) -> build (build asked) -> evaluate (evaluation or
    quantization asked) -> publish

Each stage is a thin call into ``service.compiler`` (keys, cache hits and progress come from the
pipeline runner, see ``pipeline.py``); each summary lands in the job's stage record:

* ``quantize``: ``quantize_checkpoint`` from the fetched HF folder (tp=pp=1), calibration from the
  JobSpec; artifact ``checkpoint`` (the quantized one replaces the float one in the job's artifacts).
* ``build``: ``service.compiler.build.build`` on the newest checkpoint; artifact ``engine``. The
  torch backend builds FP8, FP8 per-channel/per-token, W8A16, W4A16 and W4A16_AWQ checkpoints (and
  INT8/FP8 KV caches) natively, from the stored low-precision weights; where a backend refuses
  quantized checkpoints (onnx) and the algo is weight-only, the engine is built from the weights
  dequantized exactly as the engine would dequantize them
  (``service.compiler.quantization.dequantize.dequantize_checkpoint``) and the summary says so.
* ``evaluate``: ``service.compiler.evaluate.evaluate`` on the job's outputs: the engine against the
  reference runtime on the checkpoint it was built from and, with quantization, that checkpoint
  against the unquantized one (the user's thresholds); ``report.json`` + ``report.html``; artifact
  ``report``, kept on a failed job. The summary is the report's headline figures; a failing verdict
  fails the job with ``accuracy_below_threshold`` (``summary["gate"]``), nothing else is published.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from service.domain.errors import InvalidSpec
from service.domain.spec import JobSpec
from service.settings import Settings

from .pipeline import Progress, Stage, StageContext, register_stage

WEIGHT_ONLY = ("W8A16", "W4A16", "W4A16_AWQ")


# -- stage configs (what the key hashes) ------------------------------------------------------

def quantize_config(spec: JobSpec) -> dict | None:
    q = spec.quantization
    if not q.requested:
        return None
    cal = q.calibration.model_dump() if q.calibration else {"dataset": "bundled", "samples": 64, "seq_len": 256}
    cfg = {
        "dtype": spec.dtype, "algo": None if q.algo == "none" else q.algo,
        "kv_cache": None if q.kv_cache == "none" else q.kv_cache, "group_size": q.group_size,
        "has_zero_point": q.has_zero_point, "exclude_modules": q.exclude_modules,
        "smoothquant_alpha": q.smoothquant_alpha, "calibration": cal,
        "target_sm": spec.build.target_sm if spec.build else None,
    }
    if cfg["algo"] == "FP8":  # FP8 weights are GPTQ-rounded since this key field: older cached ones are not
        cfg["fp8_weight_rounding"] = q.calibration_method or "gptq"  # "max": the fast path
    return cfg


def build_config(spec: JobSpec) -> dict | None:
    if spec.build is None:
        return None
    return spec.build.model_dump()


def evaluate_config(spec: JobSpec) -> dict | None:
    if spec.evaluation is None and not spec.quantization.requested:
        return None
    ev = spec.evaluation.model_dump() if spec.evaluation is not None else {
        "metrics": ["perplexity", "agreement", "kl", "rouge"], "max_samples": 8, "seq_len": 128,
        "max_new_tokens": 16, "min_rouge1": None, "min_top1_agreement": None}
    return {**ev, "thresholds": spec.quantization.thresholds.model_dump() if spec.quantization.requested else None,
            "engine": spec.build is not None, "quantized": spec.quantization.requested}


def _quant_config(cfg: dict):
    from service.compiler.quantization import QuantConfig

    return QuantConfig(quant_algo=cfg["algo"], kv_cache_quant_algo=cfg["kv_cache"], group_size=cfg["group_size"],
                       has_zero_point=cfg["has_zero_point"], exclude_modules=cfg["exclude_modules"],
                       smoothquant_alpha=cfg["smoothquant_alpha"], calibration_method=cfg.get("fp8_weight_rounding"))


def _clean(value):
    """JSON-safe: NaN / inf -> None (PostgreSQL JSON and strict clients refuse them)."""
    from service.compiler.evaluate.report import json_safe

    return json_safe(value)


# -- quantize -----------------------------------------------------------------------------------

def quantize_stage(ctx: StageContext, input_dir: Path | None, output_dir: Path, cfg: dict, progress: Progress) -> dict:
    from service.compiler.quantization import CalibrationSettings, quantize_checkpoint

    hf_dir = ctx.outputs["fetch"]
    cal = cfg["calibration"]
    summary = quantize_checkpoint(hf_dir, output_dir, _quant_config(cfg),
                                  calibration=CalibrationSettings(samples=cal["samples"], seq_len=cal["seq_len"]),
                                  progress=progress, target_sm=cfg["target_sm"], dtype=cfg["dtype"], overwrite=True)
    return _clean({"quant_algo": summary.quant_algo, "kv_cache_quant_algo": summary.kv_cache_quant_algo,
                   "seconds": round(summary.seconds, 3), "timings": summary.timings, "record": summary.record})


# -- build --------------------------------------------------------------------------------------

_PROBE = {"architecture": "LlamaForCausalLM", "dtype": "float32", "hidden_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128, "intermediate_size": 128,
          "max_position_embeddings": 256}


def backend_builds_quantized(backend: str, quant_algo: str | None, kv_cache: str | None = None) -> bool:
    """Whether the compiler's build accepts a (Llama) checkpoint quantized with ``quant_algo`` and a
    ``kv_cache`` quantization for ``backend`` (asked of ``validate_build`` itself, so this follows the
    compiler as it gains support: the probe is valid unquantized, so a refusal is the quantization's)."""
    from service.compiler.build.config import BuildConfig, InvalidBuildConfig, validate_build
    from service.compiler.errors import KilnError

    bc = BuildConfig(backend=backend, target="cpu", max_batch_size=1, max_input_len=8, max_seq_len=16)
    try:
        validate_build(bc, _PROBE, machine_gpus=[])
    except KilnError:  # the backend is refused for another reason (not installed, ...): not ours to say
        return True
    probe = {**_PROBE, "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_cache}}
    try:
        validate_build(bc, probe, machine_gpus=[])
    except InvalidBuildConfig:
        return False
    except KilnError:
        return True
    return True


def check_quantized_build(spec: JobSpec) -> None:
    """Refuse at submit what neither the backend nor the dequantizing adapter can build."""
    q, b = spec.quantization, spec.build
    if b is None or not q.requested:
        return
    algo = None if q.algo == "none" else q.algo
    kv = None if q.kv_cache == "none" else q.kv_cache
    if kv and not backend_builds_quantized(b.backend, algo, kv):
        raise InvalidSpec(f"the {b.backend} engine does not execute {algo or 'an unquantized model'} with a "
                          f"quantized KV cache ({kv})",
                          hint="drop quantization.kv_cache for this build, or submit without 'build' to get the "
                               "quantized checkpoint and its accuracy report")
    if algo and not backend_builds_quantized(b.backend, algo) and algo not in WEIGHT_ONLY:
        raise InvalidSpec(f"the {b.backend} backend does not build {q.algo} checkpoints yet",
                          hint=f"use a weight-only algo ({', '.join(WEIGHT_ONLY)}) with this backend, or submit "
                               "without 'build' to get the quantized checkpoint and its accuracy report")


DEFAULT_MAX_INPUT_LEN = 1024  # the compiler's BuildConfig default, as trtllm-build's


def _build_config(cfg: dict):
    """The compiler's BuildConfig for a stage config. Unset limits follow the model the way ``kiln build``
    derives them (``validate_build``): max_seq_len = min(max_position_embeddings, max_input_len + 1024),
    an unset max_input_len = min(1024, max_seq_len)."""
    from service.compiler.build import BuildConfig

    seq, inp = cfg.get("max_seq_len"), cfg.get("max_input_len")
    if inp is None:
        inp = DEFAULT_MAX_INPUT_LEN if seq is None else min(DEFAULT_MAX_INPUT_LEN, seq)
    return BuildConfig(max_batch_size=cfg["max_batch_size"], max_input_len=inp, max_seq_len=seq,
                       target=cfg["target"], backend=cfg["backend"])


def check_explicit_limits(cfg: dict, ckpt_config: dict) -> None:
    """An explicit limit beyond the model stays an error (the compiler would shorten a derived max_input_len
    to the model's length silently, which is right only when the user did not ask for one)."""
    from service.compiler.build import InvalidBuildConfig

    model_max = int(ckpt_config.get("max_position_embeddings") or 2048)
    inp = cfg.get("max_input_len")
    if inp is not None and inp > model_max:
        raise InvalidBuildConfig(f"max_input_len={inp} is beyond the model's max_position_embeddings={model_max}",
                                 hint=f"use max_input_len <= {model_max}, or leave it unset to derive it from the model")


def build_limits(cfg: dict, resolved: dict, ckpt_config: dict) -> dict:
    """The limits the engine was built with, and which of them were derived from the model."""
    return {"max_batch_size": resolved.get("max_batch_size"), "max_input_len": resolved.get("max_input_len"),
            "max_seq_len": resolved.get("max_seq_len"), "max_num_tokens": resolved.get("max_num_tokens"),
            "derived": [k for k in ("max_input_len", "max_seq_len") if cfg.get(k) is None],
            "model_max_position_embeddings": ckpt_config.get("max_position_embeddings")}


def build_stage(ctx: StageContext, input_dir: Path | None, output_dir: Path, cfg: dict, progress: Progress) -> dict:
    from service.compiler.build import build
    from service.compiler.checkpoint.validate import load_config
    from service.compiler.quantization.dequantize import dequantize_checkpoint

    assert input_dir is not None
    ckpt = input_dir
    ckpt_config = load_config(ckpt)
    check_explicit_limits(cfg, ckpt_config)
    qcfg = ckpt_config.get("quantization") or {}
    quant = qcfg.get("quant_algo")
    note = None
    # named after output_dir (which carries the lease's job and token), so a crash's leftover is reclaimable
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.dequant-") as scratch:
        if quant and not backend_builds_quantized(cfg["backend"], quant, qcfg.get("kv_cache_quant_algo")):
            if quant not in WEIGHT_ONLY:  # refused at submit; a direct runner call lands here
                from service.compiler.build import InvalidBuildConfig

                raise InvalidBuildConfig(f"the {cfg['backend']} backend does not build {quant} checkpoints yet")
            progress(0.0, f"dequantizing {quant} weights for the {cfg['backend']} backend")
            dequantize_checkpoint(ckpt, Path(scratch) / "ckpt")
            ckpt = Path(scratch) / "ckpt"
            note = (f"built from {quant} weights dequantized as the engine dequantizes them: the {cfg['backend']} "
                    "backend does not build quantized checkpoints yet, so the engine holds them in the float dtype")
        stats = build(ckpt, _build_config(cfg), output_dir, overwrite=True, progress=progress)
    engine_cfg = json.loads((output_dir / "config.json").read_text())
    perf_file = output_dir / "performance.json"  # build / load / TTFT / decode tok/s / peak GPU memory
    performance = json.loads(perf_file.read_text()) if perf_file.is_file() else None
    return _clean({"backend": cfg["backend"], "target": cfg["target"], "arch": engine_cfg["engine"].get("arch"),
                   "build_config": engine_cfg["build_config"], "stats": stats, "quant_algo": quant,
                   "limits": build_limits(cfg, engine_cfg["build_config"], ckpt_config),
                   "weights": note or ("quantized" if quant else "float"),
                   "memory_estimate": engine_cfg["engine"].get("memory_estimate"), "performance": performance})


# -- evaluate -----------------------------------------------------------------------------------

def evaluate_stage(ctx: StageContext, input_dir: Path | None, output_dir: Path, cfg: dict, progress: Progress) -> dict:
    """``service.compiler.evaluate.evaluate`` on this job's outputs; the summary and the gate from its report."""
    from service.compiler.evaluate import EvalConfig, evaluate

    float_ckpt, q_ckpt, engine_dir = ctx.outputs["convert"], ctx.outputs.get("quantize"), ctx.outputs.get("build")
    ev = EvalConfig(samples=cfg["max_samples"], seq_len=cfg["seq_len"], max_new_tokens=cfg["max_new_tokens"],
                    metrics=tuple(cfg["metrics"]), min_rouge1=cfg.get("min_rouge1"),
                    min_top1_agreement=cfg.get("min_top1_agreement"), thresholds=cfg["thresholds"])
    if engine_dir is None:  # the quantized checkpoint vs the unquantized one (evaluation needs one of the two)
        assert q_ckpt is not None, "the evaluate stage runs after quantize or build"
        target, reference, unquantized = q_ckpt, float_ckpt, None
    elif q_ckpt is None:  # the engine vs the reference runtime on the checkpoint it was built from
        target, reference, unquantized = engine_dir, float_ckpt, None
    else:  # both: the engine vs the quantized checkpoint, which is measured against the unquantized one
        target, reference, unquantized = engine_dir, q_ckpt, float_ckpt
    meta = {"spec": {"quantization": ctx.spec.quantization.model_dump(),
                     "build": ctx.spec.build.model_dump() if ctx.spec.build else None,
                     "evaluation": ctx.spec.evaluation.model_dump() if ctx.spec.evaluation else None}}
    report = evaluate(target, reference, ev, output_dir, unquantized=unquantized, data_dir=ctx.outputs["fetch"],
                      model=ctx.spec.model, meta=meta, progress=progress)
    failures = report["failures"]
    acc, eng = report.get("accuracy") or {}, report.get("engine") or {}
    return {
        "passed": not failures, "failures": failures,
        "accuracy": {k: acc.get(k) for k in ("perplexity", "perplexity_reference", "perplexity_increase_pct",
                                             "recovery_pct", "top1_agreement", "kl_divergence", "rouge_l")} if acc else None,
        "engine": {k: eng.get(k) for k in ("max_abs_logit_error", "top1_agreement", "greedy_identical", "rouge1",
                                           "rouge_l", "perplexity")} if eng else None,
        "gate": {"passed": not failures, "code": "accuracy_below_threshold",
                 "message": "; ".join(failures)[:1500] or "passed",
                 "hint": "GET /v1/jobs/{id}/report has the full report; relax quantization.thresholds / the "
                         "evaluation floors, or choose a more accurate algo (W8A16, FP8)"},
    }


# -- submit-time checks (no files written) --------------------------------------------------------

def validate_compile(settings: Settings, spec: JobSpec, model_dir: Path | None) -> None:
    """Quantization and build checks at submit. With the model cached, the compiler's own preflights
    run too (quantizer: algo/arch, group_size vs features, SM; build: limits vs the model, memory
    estimate vs the target's nominal memory; the tokenizer's files, for the stages that read it: in the folder,
    bounded, no remote code); the target's presence is the worker's concern."""
    q, b = spec.quantization, spec.build
    if q.requested:
        from service.compiler.quantization import config as qcfg

        cfg = quantize_config(spec)
        assert cfg is not None
        qc = _quant_config(cfg)
        qcfg.check_combination(qc, "", cfg["target_sm"])
    check_quantized_build(spec)
    if q.requested and spec.source is not None and spec.source.kind == "meta":
        from service.compiler.errors import InvalidArgument

        raise InvalidArgument("quantization calibrates on text, and a Meta consolidated source has no HF tokenizer",
                              hint="submit the model's Hugging Face folder or a GGUF file with a tokenizer, or drop "
                              "'quantization'")
    if model_dir is None:
        return
    if q.requested or spec.evaluation is not None:  # their stages read the tokenizer: its files are checked now
        from service.compiler.sources.tokenizer import check_tokenizer_files

        check_tokenizer_files(model_dir)
    from service.compiler.convert import from_hugging_face

    from .job_mapping import job_mapping

    model = from_hugging_face(model_dir, dtype=spec.dtype, mapping=job_mapping(
        spec.mapping.tp_size, spec.mapping.pp_size, spec.mapping.pp_split, model_dir, spec.mapping.moe_ep_size))
    try:
        if q.requested:
            from service.compiler.quantization.quantize import preflight_quantization

            assert cfg is not None

            qcfg.check_combination(qc, model.config["architecture"], cfg["target_sm"])
            preflight_quantization(model, qc, cfg["target_sm"])
        if b is not None:
            from service.compiler.build.config import KNOWN_TARGETS, validate_build

            gpus = [KNOWN_TARGETS[b.target]] if b.target in KNOWN_TARGETS else []
            ckpt = dict(model.config)
            if q.requested and q.algo in WEIGHT_ONLY and not backend_builds_quantized(b.backend, q.algo):
                ckpt["quantization"] = {}  # the adapter builds it dequantized
            elif q.requested:
                ckpt["quantization"] = {"quant_algo": None if q.algo == "none" else q.algo}
            bcfg = build_config(spec)
            assert bcfg is not None
            check_explicit_limits(bcfg, ckpt)
            validate_build(_build_config(bcfg), ckpt, machine_gpus=gpus)
    finally:
        model.close()


register_stage(Stage("quantize", quantize_stage, config=quantize_config, artifact="checkpoint",
                     handles="quantization", weight=1.0), after="convert")
register_stage(Stage("build", build_stage, config=build_config, artifact="engine", handles="build",
                     weight=1.0), after="quantize")
register_stage(Stage("evaluate", evaluate_stage, config=evaluate_config, artifact="report", handles="evaluation",
                     weight=1.0, keep_on_failure=True), after="build")

"""quantize -> build -> evaluate: the compiler's later stages, registered into the pipeline.

    fetch -> convert -> quantize (quantization asked) -> build (build asked) -> evaluate (evaluation or
    quantization asked) -> publish

Each stage is a thin call into ``service.compiler`` (keys, cache hits and progress come from the
pipeline runner, see ``pipeline.py``); each summary lands in the job's stage record:

* ``quantize``: ``quantize_checkpoint`` from the fetched HF folder (tp=pp=1), calibration from the
  JobSpec; artifact ``checkpoint`` (the quantized one replaces the float one in the job's artifacts).
* ``build``: ``service.compiler.build.build`` on the newest checkpoint; artifact ``engine``. Adapter:
  the torch backend builds FP8, FP8 per-channel/per-token, W8A16, W4A16 and W4A16_AWQ checkpoints
  (and INT8/FP8 KV caches) natively, from the stored low-precision weights; where a backend refuses
  quantized checkpoints (onnx) and the algo is weight-only, the engine is built from the weights
  dequantized exactly as the engine would dequantize them (``qlinear.dequantize_weight``) and the
  summary says so.
* ``evaluate``: a report written here (``service/compiler/evaluate`` does not exist yet): the
  quantizer's accuracy report (quantized vs unquantized, the user's thresholds) and the engine against
  the reference runtime on the checkpoint it was built from (logit error, top-1 agreement, KL,
  perplexity, greedy identity, ROUGE-1/2/L, load/TTFT/decode timings). ``report.json`` +
  ``report.html``; artifact ``report``, kept on a failed job. A failing verdict fails the job with
  ``accuracy_below_threshold`` (``summary["gate"]``), nothing else is published.
"""

from __future__ import annotations

import html
import json
import math
import tempfile
import time
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
        cfg["fp8_weight_rounding"] = "gptq"
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
                       smoothquant_alpha=cfg["smoothquant_alpha"])


def _clean(value):
    """JSON-safe: NaN / inf -> None (PostgreSQL JSON and strict clients refuse them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# -- quantize -----------------------------------------------------------------------------------

def quantize_stage(ctx: StageContext, input_dir: Path | None, output_dir: Path, cfg: dict, progress: Progress) -> dict:
    from service.compiler.quantization import CalibrationSettings, quantize_checkpoint

    hf_dir = ctx.outputs["fetch"]
    cal = cfg["calibration"]
    summary = quantize_checkpoint(hf_dir, output_dir, _quant_config(cfg),
                                  calibration=CalibrationSettings(samples=cal["samples"], seq_len=cal["seq_len"]),
                                  progress=progress, target_sm=cfg["target_sm"], dtype=cfg["dtype"], overwrite=True)
    return _clean({"quant_algo": summary.quant_algo, "kv_cache_quant_algo": summary.kv_cache_quant_algo,
                   "seconds": round(summary.seconds, 3), "record": summary.record})


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


def dequantize_checkpoint(src: Path, dst: Path) -> str:
    """A float world-size-1 checkpoint with the weights a weight-only engine multiplies by."""
    import torch
    from safetensors.torch import save_file

    from service.compiler.quantization.layout import linear_module
    from service.compiler.quantization.qlinear import FLOAT_DTYPES, QUANT_PARAM_SUFFIXES, dequantize_weight
    from service.compiler.safetensors_io import SafetensorsFile

    config = json.loads((src / "config.json").read_text())
    quant = config.get("quantization") or {}
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[config["dtype"]]
    with SafetensorsFile(src / "rank0.safetensors") as f:
        tensors = {n: f.tensor(n).clone() for n in f.keys()}
    out = {}
    for name, t in tensors.items():
        if name.endswith(QUANT_PARAM_SUFFIXES):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module and t.dtype not in FLOAT_DTYPES and linear_module(name, (1, 1)):
            out[name] = dequantize_weight(tensors, module, quant).to(dtype).contiguous()
        else:
            out[name] = t.contiguous()
    algo = quant.get("quant_algo")
    config["quantization"] = {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128,
                              "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None}
    config["kiln_dequantized_from"] = algo
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "rank0.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in src.iterdir():  # tokenizer files travel with the checkpoint
        if extra.is_file() and extra.name not in ("config.json", "rank0.safetensors", "manifest.json"):
            (dst / extra.name).write_bytes(extra.read_bytes())
    return algo


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
    from service.compiler.checkpoint import load_config

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
    return _clean({"backend": cfg["backend"], "target": cfg["target"], "arch": engine_cfg["engine"]["arch"],
                   "build_config": engine_cfg["build_config"], "stats": stats, "quant_algo": quant,
                   "limits": build_limits(cfg, engine_cfg["build_config"], ckpt_config),
                   "weights": note or ("quantized" if quant else "float"),
                   "memory_estimate": engine_cfg["engine"].get("memory_estimate"), "performance": performance})


# -- evaluate -----------------------------------------------------------------------------------

def _eval_data(hf_dir: Path, vocab: int, samples: int, seq_len: int):
    """Held-out token windows: the bundled text's end when the model has a tokenizer, else seeded
    random ids (recorded as such: tiny test models ship no tokenizer)."""
    import torch

    from service.compiler.quantization.calibration import evaluation_windows, load_tokenizer

    if load_tokenizer(hf_dir) is not None:
        return evaluation_windows(hf_dir, samples, seq_len), "bundled text (held out from calibration)"
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (samples, seq_len), generator=gen), "random token ids (the model has no tokenizer)"


def _rouge_n(cand: list[int], ref: list[int], n: int) -> float:
    from collections import Counter

    c = Counter(tuple(cand[i:i + n]) for i in range(len(cand) - n + 1))
    r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    m = sum((c & r).values())
    total = sum(c.values()) + sum(r.values())
    return 0.0 if m == 0 or total == 0 else 2 * m / total


def _rouge_of(candidate_ckpt: Path, reference_ckpt: Path, prompts: list[list[int]], max_new: int) -> tuple[float, float]:
    """Mean ROUGE-1 / ROUGE-L of the candidate's greedy continuations against the reference's (the
    reference runtime executes quantized checkpoints from their stored low-precision tensors)."""
    from service.compiler.quantization.report import rouge
    from service.compiler.runtime import ReferenceModel

    cand, ref = ReferenceModel.from_checkpoint(candidate_ckpt), ReferenceModel.from_checkpoint(reference_ckpt)
    scores = [rouge(cand.generate(p, max_new), ref.generate(p, max_new)) for p in prompts]
    return sum(r[0] for r in scores) / len(scores), sum(r[1] for r in scores) / len(scores)


def engine_vs_reference(engine_dir: Path, ckpt_dir: Path, windows, prompts: list[list[int]], max_new: int,
                        progress: Progress) -> dict:
    """The engine against the reference runtime (the numerical oracle) on the checkpoint it came from."""
    import torch
    import torch.nn.functional as F

    from service.compiler.quantization.report import perplexity, rouge
    from service.compiler.runtime import ReferenceModel
    from service.compiler.runtime.engine import Engine

    t0 = time.perf_counter()
    engine = Engine.load(engine_dir)
    load_s = time.perf_counter() - t0
    ref = ReferenceModel.from_checkpoint(ckpt_dir)
    progress(0.55, "engine vs reference: logits")
    w = windows[:, : min(windows.shape[1], engine.max_seq)]
    le, lr = [], []
    for b0 in range(0, w.shape[0], engine.max_batch):
        chunk = w[b0:b0 + engine.max_batch]
        le.append(engine.forward(chunk).float())
        lr.append(ref.forward(chunk).float())
    le, lr = torch.cat(le), torch.cat(lr)
    diff = (le - lr).abs()
    lpr, lpe = F.log_softmax(lr, -1), F.log_softmax(le, -1)
    progress(0.75, "engine vs reference: greedy generations")
    gen = engine.generate(prompts, max_new_tokens=max_new)
    ref_gen = [ref.generate(p, max_new) for p in prompts]
    r1, r2, rl = [], [], []
    for a, b in zip(gen.tokens, ref_gen, strict=True):
        x, y = rouge(a, b)
        r1.append(x)
        rl.append(y)
        r2.append(_rouge_n(a, b, 2))
    n = max(len(prompts), 1)
    return {
        "windows": [int(w.shape[0]), int(w.shape[1])],
        "max_abs_logit_error": float(diff.max()), "mean_abs_logit_error": float(diff.mean()),
        "top1_agreement": float((le.argmax(-1) == lr.argmax(-1)).float().mean()),
        "kl_divergence": float((lpr.exp() * (lpr - lpe)).sum(-1).mean()),
        "perplexity": perplexity(le, w), "perplexity_reference": perplexity(lr, w),
        "greedy_identical": sum(a == b for a, b in zip(gen.tokens, ref_gen, strict=True)) / n,
        "rouge1": sum(r1) / n, "rouge2": sum(r2) / n, "rouge_l": sum(rl) / n,
        "prompts": len(prompts), "max_new_tokens": max_new,
        "performance": {"load_seconds": round(load_s, 3), **engine.load_stats,
                        "ttft_seconds": gen.stats.get("ttft_seconds"),
                        "decode_tokens_per_second": gen.stats.get("decode_tokens_per_second"),
                        "batch": len(prompts), "build": engine.config.get("build_stats")},
        "device": str(engine.device),
    }


def evaluate_stage(ctx: StageContext, input_dir: Path | None, output_dir: Path, cfg: dict, progress: Progress) -> dict:
    from service.compiler.quantization.report import CheckpointRunner, Thresholds, compare

    hf_dir, float_ckpt = ctx.outputs["fetch"], ctx.outputs["convert"]
    q_ckpt, engine_dir = ctx.outputs.get("quantize"), ctx.outputs.get("build")
    vocab = int(json.loads((float_ckpt / "config.json").read_text())["vocab_size"])
    windows, source = _eval_data(hf_dir, vocab, cfg["max_samples"], cfg["seq_len"])
    plen = max(2, min(16, windows.shape[1] // 2))
    prompts = [windows[i, :plen].tolist() for i in range(min(4, windows.shape[0]))] if "rouge" in cfg["metrics"] else []
    report: dict = {"model": ctx.spec.model, "data": {"source": source, "samples": int(windows.shape[0]),
                                                      "seq_len": int(windows.shape[1]), "prompt_tokens": plen},
                    "spec": {"quantization": ctx.spec.quantization.model_dump(),
                             "build": ctx.spec.build.model_dump() if ctx.spec.build else None,
                             "evaluation": ctx.spec.evaluation.model_dump() if ctx.spec.evaluation else None}}
    failures: list[str] = []
    if q_ckpt is not None:
        progress(0.05, "accuracy of the quantized checkpoint vs the unquantized model")
        th = Thresholds(**cfg["thresholds"])
        rep = compare(CheckpointRunner.from_dir(q_ckpt), CheckpointRunner.from_dir(float_ckpt), windows,
                      None, cfg["max_new_tokens"], th)
        if prompts:  # greedy continuations with a KV cache (the quantizer's runner re-runs the whole prefix)
            progress(0.25, "greedy continuations of the quantized and the unquantized model")
            rep.rouge1, rep.rouge_l = _rouge_of(q_ckpt, float_ckpt, prompts, cfg["max_new_tokens"])
            if rep.rouge_l < th.min_rouge_l:
                rep.failures.append(f"ROUGE-L {rep.rouge_l:.3f} < {th.min_rouge_l}")
        report["accuracy"] = rep.to_dict()
        failures += [f"accuracy: {f}" for f in rep.failures]
    if engine_dir is not None:
        progress(0.4, "engine vs reference runtime")
        built_from = q_ckpt if q_ckpt is not None else float_ckpt
        eng = engine_vs_reference(engine_dir, built_from, windows, prompts or [windows[0, :plen].tolist()],
                                  cfg["max_new_tokens"], progress)
        eng["reference"] = "reference runtime on the " + ("quantized" if q_ckpt is not None else "converted") + " checkpoint"
        report["engine"] = eng
        if cfg.get("min_rouge1") is not None and eng["rouge1"] < cfg["min_rouge1"]:
            failures.append(f"engine: ROUGE-1 {eng['rouge1']:.3f} < {cfg['min_rouge1']}")
        if cfg.get("min_top1_agreement") is not None and eng["top1_agreement"] < cfg["min_top1_agreement"]:
            failures.append(f"engine: top-1 agreement {eng['top1_agreement']:.3f} < {cfg['min_top1_agreement']}")
    report["passed"], report["failures"] = not failures, failures
    report = _clean(report)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (output_dir / "report.html").write_text(render_html(report))
    progress(1.0, "passed" if not failures else f"{len(failures)} threshold(s) failed")
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


def render_html(report: dict) -> str:
    esc = lambda v: html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731

    def table(title: str, rows: dict) -> str:
        body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows.items()
                       if not isinstance(v, (dict, list)))
        return f"<h2>{esc(title)}</h2><table>{body}</table>"

    parts = [f"<h1>Kiln report: {esc(report['model'])}</h1>",
             f"<p class=verdict>{'PASSED' if report['passed'] else 'FAILED: ' + esc('; '.join(report['failures']))}</p>",
             table("data", report["data"])]
    bars = []
    for section in ("accuracy", "engine"):
        if report.get(section):
            parts.append(table(section, report[section]))
            v = report[section].get("top1_agreement")
            if isinstance(v, float):
                bars.append((f"{section} top-1 agreement", v))
            v = report[section].get("rouge_l")
            if isinstance(v, float):
                bars.append((f"{section} ROUGE-L", v))
    if report.get("engine", {}).get("performance"):
        parts.append(table("engine performance", report["engine"]["performance"]))
    if bars:
        svg = "".join(f'<text x="0" y="{20 + 24 * i}">{esc(n)}</text>'
                      f'<rect x="220" y="{8 + 24 * i}" width="{300 * max(0.0, min(1.0, v)):.1f}" height="16" fill="#3b7"/>'
                      f'<text x="{228 + 300 * max(0.0, min(1.0, v)):.1f}" y="{20 + 24 * i}">{v:.3f}</text>'
                      for i, (n, v) in enumerate(bars))
        parts.append(f'<h2>chart</h2><svg width="600" height="{16 + 24 * len(bars)}" font-size="12">{svg}</svg>')
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}" \
            "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}.verdict{font-weight:bold}"
    return f"<!doctype html><meta charset=utf-8><title>Kiln report</title><style>{style}</style>{''.join(parts)}\n"


# -- submit-time checks (no files written) --------------------------------------------------------

def validate_compile(settings: Settings, spec: JobSpec, model_dir: Path | None) -> None:
    """Quantization and build checks at submit. With the model cached, the compiler's own preflights
    run too (quantizer: algo/arch, group_size vs features, SM; build: limits vs the model, memory
    estimate vs the target's nominal memory); the target's presence is the worker's concern."""
    q, b = spec.quantization, spec.build
    if q.requested:
        from service.compiler.quantization import config as qcfg

        cfg = quantize_config(spec)
        assert cfg is not None
        qc = _quant_config(cfg)
        qcfg.check_combination(qc, "", cfg["target_sm"])
    check_quantized_build(spec)
    if model_dir is None:
        return
    from service.compiler.convert import from_hugging_face

    from .stages import job_mapping

    model = from_hugging_face(model_dir, dtype=spec.dtype, mapping=job_mapping(
        spec.mapping.tp_size, spec.mapping.pp_size, spec.mapping.pp_split, model_dir))
    try:
        if q.requested:
            from service.compiler.quantization.quantize import preflight_quantization

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

"""The quantize stage: HF folder (or ``HFCheckpointModel``) -> quantized TensorRT-LLM checkpoint.

    from service.compiler.quantization import QuantConfig, CalibrationSettings, quantize_checkpoint
    quantize_checkpoint("./SmolLM2-135M", "./ckpt-awq", QuantConfig("W4A16_AWQ"),
                        calibration=CalibrationSettings(samples=64, seq_len=512), progress=print)

Every refusal (unknown or unsupported algo, algo on Nemotron-NAS, FP8 on a target below SM 8.9,
group_size not dividing an input dimension, missing calibration data, existing output) happens before
anything is written. The float checkpoint streams layer by layer (``calibration.py``; on the GPU when
there is one): each layer's activation statistics are collected and its searches run (AWQ scales and
clips, the INT8 KV clip, FP8's GPTQ weight rounding), then the layer is quantized and written at once,
into rank files sized from ``layout.quantized_expected`` — one read of the weights. Only SmoothQuant's
alpha *search* needs a second pass (the alpha is chosen on the model's output, after the last layer):
pass 1 calibrates, pass 2 streams the weights again and writes. The directory appears atomically
(temp dir + rename). ``QuantizeSummary.record["timings"]`` splits the wall time into reading the
weights, calibration (forward passes, statistics, searches), quantizing (GPTQ rounding and the
per-layer quantization) and writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint.safetensors_io import SafetensorsWriter, dtype_name, publish_dir
from ..errors import InvalidArgument, InvalidCheckpoint, OutputExists
from . import config as qc
from .awq import awq_search, awq_tensors
from .calibration import (
    CalibrationData,
    CalibrationSettings,
    ModuleStats,
    calibration_data,
    hooked_linear,
    kv_amax_hook,
    stream_layers,
)
from .config import QuantConfig
from .decoder import Decoder
from .fp8 import GPTQ_BLOCK, GPTQ_DAMP, gptq_fp8, output_error, scale_from_amax, to_fp8
from .fp8 import quantize_per_channel as fp8_per_channel
from .fp8 import quantize_per_tensor as fp8_per_tensor
from .kv_cache import kv_cache_scale, qdq_kv
from .layout import is_quantized_linear, linear_module, quantized_expected
from .qlinear import layer_kv, layer_linear
from .smoothquant import sq_group_tensors, sq_per_token_group
from .weight_only import quantize_weight_only

ProgressFn = Callable[[float, str], None]
MICRO_BATCH = 8  # calibration samples per layer forward
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LayerResult:
    amax: dict[str, torch.Tensor] = field(default_factory=dict)
    awq: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    awq_gain: dict[str, float] = field(default_factory=dict)  # search loss / RTN loss
    kv_amax: float = 0.0
    fp8: dict[str, torch.Tensor] | None = None  # FP8 + GPTQ: this layer's E4M3 weights and scales
    gptq_gain: dict[str, float] = field(default_factory=dict)  # GPTQ output error / round-to-nearest's


def _result_on(res: LayerResult, device: torch.device) -> LayerResult:
    """``res`` with its tensors on ``device`` (the write pass quantizes where calibration ran)."""
    return replace(res, amax={m: a.to(device) for m, a in res.amax.items()},
                   awq={m: (p.to(device), None if c is None else c.to(device)) for m, (p, c) in res.awq.items()})


TIMED_PARTS = ("load", "calibration", "quantize", "write")


class StageClock:
    """Wall time per part of the quantize stage (seconds): ``load`` (reading the source weights and
    moving them to the device), ``calibration`` (calibration data, forward passes, statistics,
    searches), ``quantize`` (GPTQ rounding and each layer's quantization), ``write`` (copying results
    to the host, writing, fsync, publishing). On a GPU every part ends with a synchronize, so the
    asynchronous kernels are counted where they were launched."""

    def __init__(self, device: torch.device | None = None):
        self.seconds = dict.fromkeys(TIMED_PARTS, 0.0)
        self.sync = device is not None and device.type == "cuda"
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def timed(self, name: str, items: Iterable) -> Iterator:
        """``items`` with the time spent producing each one counted as ``name``."""
        it = iter(items)
        while True:
            with self.part(name):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def record(self) -> dict:
        total = time.perf_counter() - self.start
        out = {f"{k}_s": round(v, 3) for k, v in self.seconds.items()}
        out["other_s"] = round(max(total - sum(self.seconds.values()), 0.0), 3)
        out["total_s"] = round(total, 3)
        return out


@dataclass
class QuantizeSummary:
    out_dir: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    seconds: float
    record: dict
    timings: dict = field(default_factory=dict)  # StageClock.record(): seconds per part

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo,
                "seconds": self.seconds, "timings": self.timings, "record": self.record}

    def line(self) -> str:
        parts = ", ".join(f"{k} {self.timings[k + '_s']:.1f} s" for k in TIMED_PARTS if k + "_s" in self.timings)
        return (f"quantized -> {self.out_dir}: {self.quant_algo or '-'} / KV {self.kv_cache_quant_algo or '-'} "
                f"in {self.seconds:.1f} s" + (f" ({parts})" if parts else ""))


def linear_groups(t: dict[str, torch.Tensor]) -> list[list[str]]:
    """Linears of one layer that share an input (layer-local module names)."""
    mods = [n[: -len(".weight")] for n in t if linear_module("transformer.layers.0." + n, tuple(t[n].shape))]
    groups = []
    for first, *rest in (["attention.qkv"], ["attention.dense"], ["mlp.fc", "mlp.gate"], ["mlp.proj"]):
        g = [m for m in [first, *rest] if m in mods]
        if g:
            groups.append(g)
    return groups


# --- per-layer quantization (shared by the alpha search and the writer) ---------------------------


def quantize_layer(t: dict[str, torch.Tensor], layer: int, res: LayerResult, cfg: QuantConfig, quant: dict,
                   dtype: torch.dtype, alpha: float | None) -> dict[str, torch.Tensor]:
    """Layer-local float tensors -> layer-local checkpoint tensors (quantized linears, KV scale)."""
    out = dict(t)
    algo = cfg.quant_algo
    full = f"transformer.layers.{layer}."

    def quantized(m: str) -> bool:
        return is_quantized_linear(full + m + ".weight", tuple(t[m + ".weight"].shape), quant)

    spooled = res.fp8 if algo == qc.FP8 else None

    for group in linear_groups(t) if algo else []:
        mods = [m for m in group if quantized(m)]
        if not mods:
            continue
        made: list[dict[str, torch.Tensor]]
        ws = [t[m + ".weight"] for m in mods]
        if algo == qc.FP8:
            a_scale = scale_from_amax(res.amax[group[0]].max()).reshape(1)
            made = []
            for m, w in zip(mods, ws, strict=False):
                w8, s = (spooled[m + ".weight"], spooled[m + ".weights_scaling_factor"]) if spooled else fp8_per_tensor(w)
                made.append({"weight": w8, "weights_scaling_factor": s, "activation_scaling_factor": a_scale})
        elif algo == qc.FP8_PER_CHANNEL_PER_TOKEN:
            made = [dict(zip(("weight", "per_channel_scale"), fp8_per_channel(w), strict=False)) for w in ws]
        elif algo in qc.WEIGHT_ONLY:
            made = [quantize_weight_only(w, 8 if algo == qc.W8A16 else 4, dtype) for w in ws]
        elif algo == qc.W4A16_AWQ:
            made = [awq_tensors(w, *res.awq[m], cfg.group_size, dtype, zero_point=cfg.has_zero_point)
                    for m, w in zip(mods, ws, strict=False)]
        elif algo == qc.W8A8_SQ_PER_CHANNEL:
            assert alpha is not None
            made = sq_group_tensors(ws, res.amax[group[0]], alpha, dtype)
        elif algo == qc.W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN:
            norm = {"attention.qkv": "input_layernorm", "mlp.fc": "post_layernorm"}.get(group[0])
            # Folding s into the norm needs every consumer of that norm quantized here; otherwise no smoothing.
            a = alpha if norm is None or len(mods) == len(group) else None
            made, sm = sq_per_token_group(ws, res.amax[group[0]], a, smoother=norm is None)
            if norm is not None:
                for k in ("weight", "bias"):
                    if f"{norm}.{k}" in t:
                        out[f"{norm}.{k}"] = (t[f"{norm}.{k}"].float() / sm).to(t[f"{norm}.{k}"].dtype)
        else:
            raise InvalidArgument(f"{algo} quantization is not implemented by Kiln yet",
                                  hint="use FP8, FP8_PER_CHANNEL_PER_TOKEN, W8A16, W4A16, W4A16_AWQ or W8A8_SQ_PER_CHANNEL")
        for m, tensors in zip(mods, made, strict=False):
            for k, v in tensors.items():
                out[f"{m}.{k}"] = v
    if algo == qc.W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN:  # per-token: the static factors are 1.0
        one = torch.ones(1, dtype=torch.float32)
        for norm, block in (("input_layernorm", "attention"), ("post_layernorm", "mlp")):
            if f"{norm}.weight" in t:
                out[f"{norm}.scale_to_int"] = one
                out[f"{block}.quantization_scaling_factor"] = one
    if cfg.kv_cache_quant_algo and "attention.qkv.weight" in t:
        out["attention.kv_cache_scaling_factor"] = kv_cache_scale(res.kv_amax, cfg.kv_cache_quant_algo)
    return out


# --- pass 1: sequential calibration ------------------------------------------------------------------


def _heldout_scores(dec: Decoder, tail: dict, fp: torch.Tensor, streams: dict[float, torch.Tensor],
                    ids: torch.Tensor) -> dict[float, tuple[float, float]]:
    """Per alpha: (mean KL(P_float || P_alpha), mean NLL) on the held-out windows, one window at a time."""
    kl = dict.fromkeys(streams, 0.0)
    nll = dict.fromkeys(streams, 0.0)
    for i in range(ids.shape[0]):
        ref = F.log_softmax(dec.head(tail, fp[i:i + 1]), -1)
        for a, h in streams.items():
            lp = F.log_softmax(dec.head(tail, h[i:i + 1]), -1)
            kl[a] += float((ref.exp() * (ref - lp)).sum(-1).mean()) / ids.shape[0]
            nll[a] += float(F.nll_loss(lp[0, :-1], ids[i, 1:].to(lp.device))) / ids.shape[0]
    return {a: (kl[a], nll[a]) for a in streams}


KV_CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def search_int8_kv_clip(dec: Decoder, t: dict, h: torch.Tensor, amax: float) -> float:
    """The INT8 KV scale's clip ratio (scale = ratio * amax / 127) with the lowest attention-output error.

    TensorRT-LLM keeps one scale for K and V; amax/127 (its converter's choice) sizes it for the largest
    K outlier and leaves V coarse. The candidates run the layer's attention on calibration activations.
    """
    x = dec.norm(t, "input_layernorm", h) if dec.pre_ln else h
    linear = dec.float_linear(t)
    ref = dec.attention(t, x, linear, None)
    best, best_err = 1.0, float("inf")
    for r in KV_CLIP_RATIOS:
        scale = torch.tensor([r * amax / 127.0])

        def kv(k: torch.Tensor, v: torch.Tensor, s: torch.Tensor = scale) -> tuple[torch.Tensor, torch.Tensor]:
            return qdq_kv(k, s, qc.INT8), qdq_kv(v, s, qc.INT8)

        out = dec.attention(t, x, linear, kv)
        err = float((out - ref).pow(2).mean())
        if err < best_err:
            best, best_err = r, err
    return best


def fp8_gptq_layer(t: dict[str, torch.Tensor], layer: int, stats: dict[str, ModuleStats], quant: dict,
                   res: LayerResult) -> None:
    """GPTQ-rounded E4M3 weights of one layer into ``res.fp8`` (on the layer's device). The Hessian
    Σ xᵀx is accumulated once per input (the fused qkv; fc and gate, which read the same input, are
    stacked and rounded together against one Hessian, each keeping its own amax / 448 scale)."""
    full = f"transformer.layers.{layer}."
    out: dict[str, torch.Tensor] = {}
    for group in linear_groups(t):
        mods = [m for m in group if is_quantized_linear(full + m + ".weight", tuple(t[m + ".weight"].shape), quant)]
        h = stats[group[0]].hessian if group[0] in stats else None
        if not mods or h is None:
            continue
        ws = [t[m + ".weight"].float() for m in mods]
        scales = [scale_from_amax(w.abs().max()).reshape(1).to(w.device) for w in ws]
        rows = torch.cat([s.expand(w.shape[0]) for w, s in zip(ws, scales, strict=False)])
        codes = gptq_fp8(torch.cat(ws), h, rows).split([w.shape[0] for w in ws])
        for m, w, s, c in zip(mods, ws, scales, codes, strict=False):
            rtn = output_error(w, to_fp8(w, s).float() * s, h)
            res.gptq_gain[m] = output_error(w, c.float() * s, h) / rtn if rtn > 0 else 1.0
            out[m + ".weight"], out[m + ".weights_scaling_factor"] = c, s
    res.fp8 = out


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


LayerSink = Callable[[int | None, dict[str, torch.Tensor], dict[str, torch.Tensor], "LayerResult | None"], None]


def calibrate(model, cfg: QuantConfig, data: CalibrationData, settings: CalibrationSettings, quant: dict,
              dtype: torch.dtype, progress: ProgressFn | None, *, sink: LayerSink | None = None,
              clock: StageClock | None = None, progress_span: float = 0.85) -> tuple[dict[int, LayerResult], dict]:
    """The sequential calibration pass. With ``sink``, each group of tensors is handed on as soon as it
    is calibrated — ``sink(None, host, device, None)`` for the globals before and after the layers,
    ``sink(i, host, device, result)`` for layer i (``result``'s tensors on the device) — and the
    returned dict is empty; without, the per-layer results (on the CPU) are returned for a second pass."""
    clock = clock or StageClock()
    dec = Decoder(model.config)
    n_layers = model.config["num_hidden_layers"]
    results: dict[int, LayerResult] = {}
    search = cfg.quant_algo in qc.SMOOTHQUANT and cfg.smoothquant_alpha is None
    if search and sink is not None:
        raise ValueError("the SmoothQuant alpha search needs the whole model before any layer is written")
    alphas = list(cfg.alpha_grid) if search else []
    gen = torch.Generator().manual_seed(settings.seed)
    h: torch.Tensor | None = None
    streams: dict[float, torch.Tensor] = {}
    fp = torch.empty(0)
    record: dict = {}
    kv_ratios: list[float] = []
    awq_gains: list[float] = []
    gptq_gains: list[float] = []
    device = torch.device(settings.resolved_device)
    gptq = cfg.quant_algo == qc.FP8 and cfg.fp8_gptq
    # FP8's fast path (plain max calibration) takes only activation maxima from the forward passes: on
    # a GPU its float32 matmuls may run as TF32 (10-bit mantissa, finer than the bf16 forward ModelOpt
    # calibrates with); every other path keeps IEEE float32
    tf32 = device.type == "cuda" and cfg.quant_algo == qc.FP8 and not cfg.fp8_gptq
    for idx, host in stream_layers(clock.timed("load", model.tensors(0))):
        with clock.part("load"):
            t = {k: v.to(device) for k, v in host.items()}
        if idx is None and h is None:  # globals before the layers: embed
            with clock.part("calibration"):
                h = dec.embed(t, data.calib)
                if search:
                    fp = dec.embed(t, data.heldout)
                    streams = dict.fromkeys(alphas, fp)
            if sink is not None:
                sink(None, host, t, None)
            continue
        if idx is None:  # the tail: score the alpha streams against the float stream
            if search:
                with clock.part("calibration"):
                    scores = _heldout_scores(dec, t, fp, streams, data.heldout)
                best = min(scores, key=lambda a: (scores[a][0], -a))
                record["smoothquant_alpha"] = best
                record["alpha_heldout_kl"] = {str(a): round(v[0], 5) for a, v in scores.items()}
                record["alpha_heldout_nll"] = {str(a): round(v[1], 5) for a, v in scores.items()}
            if sink is not None:
                sink(None, host, t, None)
            continue
        assert h is not None
        res = LayerResult()
        stats: dict[str, ModuleStats] = {}
        with clock.part("calibration"), _tf32(tf32):
            kvbox = [0.0]
            n = h.shape[0]
            batches = list(range(0, n, MICRO_BATCH))
            per_batch = max(1, -(-settings.awq_tokens // len(batches)))
            outs: list[torch.Tensor] = []
            samples: dict[str, list[torch.Tensor]] = {}
            hessian = frozenset(g[0] for g in linear_groups(t)) if gptq else frozenset()
            for b0 in batches:
                hb = h[b0:b0 + MICRO_BATCH]
                tokens = hb.shape[0] * hb.shape[1]
                idx_s = (torch.randperm(tokens, generator=gen)[:per_batch]
                         if cfg.quant_algo == qc.W4A16_AWQ else None)
                outs.append(dec.layer(t, hb, linear=hooked_linear(t, stats, idx_s, hessian),
                                      kv=kv_amax_hook(kvbox) if cfg.kv_cache_quant_algo else None))
                for m, st in stats.items():
                    if st.sample is not None:
                        samples.setdefault(m, []).append(st.sample)
                        st.sample = None
            h_next = torch.cat(outs)
            res.amax = {m: st.amax for m, st in stats.items() if st.amax is not None}
            res.kv_amax = kvbox[0]
            if cfg.kv_cache_quant_algo == qc.INT8 and cfg.kv_clip_search and res.kv_amax > 0:
                ratio = search_int8_kv_clip(dec, t, h[:MICRO_BATCH], res.kv_amax)
                res.kv_amax *= ratio
                kv_ratios.append(ratio)
            if cfg.quant_algo == qc.W4A16_AWQ:
                full = f"transformer.layers.{idx}."
                for group in linear_groups(t):
                    mods = [m for m in group
                            if is_quantized_linear(full + m + ".weight", tuple(t[m + ".weight"].shape), quant)]
                    if not mods:
                        continue
                    r = awq_search([t[m + ".weight"] for m in mods], torch.cat(samples[group[0]]),
                                   stats[group[0]].mean_abs, cfg.group_size, dtype, zero_point=cfg.has_zero_point,
                                   n_grid=cfg.awq_grid, clip=cfg.awq_clip)
                    for m, c in zip(mods, r.clips, strict=False):
                        res.awq[m] = (r.pre_quant_scale, c)
                        res.awq_gain[m] = r.loss / r.rtn_loss if r.rtn_loss > 0 else 1.0
        if gptq:
            with clock.part("quantize"):
                fp8_gptq_layer(t, idx, stats, quant, res)
        stats.clear()  # the Hessians are the largest per-layer state
        if search:
            with clock.part("calibration"):
                fp = dec.layer(t, fp)
                for a in alphas:
                    qt = quantize_layer(t, idx, res, cfg, quant, dtype, a)
                    streams[a] = dec.layer(qt, streams[a], linear=layer_linear(qt, quant), kv=layer_kv(qt, quant))
        awq_gains += res.awq_gain.values()
        gptq_gains += res.gptq_gain.values()
        if sink is not None:
            sink(idx, host, t, res)
        else:
            res.amax = {m: a.cpu() for m, a in res.amax.items()}  # results live on the CPU for pass 2
            res.awq = {m: (p.cpu(), None if c is None else c.cpu()) for m, (p, c) in res.awq.items()}
            results[idx] = res
        h = h_next
        if progress:
            progress(progress_span * (idx + 1) / n_layers,
                     f"{'calibrated' if sink is None else 'calibrated and wrote'} layer {idx + 1}/{n_layers}")
    if kv_ratios:
        record["int8_kv_clip_ratios"] = kv_ratios
    if cfg.quant_algo == qc.W4A16_AWQ:
        record["awq_mean_loss_vs_rtn"] = round(sum(awq_gains) / max(len(awq_gains), 1), 4)
    if gptq:
        record["fp8_gptq_mean_loss_vs_rtn"] = round(sum(gptq_gains) / max(len(gptq_gains), 1), 4)
    return results, record


# --- checks before any work ----------------------------------------------------------------------


def preflight_quantization(model, cfg: QuantConfig, target_sm: int | None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every refusal, then the base (float) spec of rank 0."""
    if not cfg.enabled:
        raise InvalidArgument("no quantization requested", hint="set quant_algo and/or kv_cache_quant_algo")
    arch = model.config["architecture"]
    qc.check_combination(cfg, arch, target_sm)
    if model.mapping.world_size != 1:
        raise InvalidArgument("Kiln quantizes at tp_size=1, pp_size=1",
                              hint="quantize first, then shard the quantized checkpoint")
    if cfg.needs_calibration or cfg.quant_algo in qc.SMOOTHQUANT:
        Decoder(model.config)  # raises UnsupportedArchitecture for layers the calibrator cannot run
    if cfg.quant_algo == qc.W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN and not model.config.get("do_layer_norm_before", True):
        raise InvalidArgument(f"{cfg.quant_algo} folds the smoothing into the layer norms, which post-LN OPT "
                              "models cannot take", hint="use W8A8_SQ_PER_CHANNEL")
    base = [(p.name, tuple(p.shape), p.dtype) for p in model.plans(0)]
    quant = cfg.to_checkpoint_dict()
    for name, shape, _ in base:
        if not is_quantized_linear(name, shape, quant):
            continue
        module = name[: -len(".weight")]
        if cfg.quant_algo == qc.W4A16_AWQ and shape[1] % cfg.group_size:
            raise InvalidArgument(
                f"group_size {cfg.group_size} does not divide the {shape[1]} input features of {module}",
                hint="choose a group_size that divides every linear's input dimension (64 or 128 usually do)")
        if cfg.quant_algo in (qc.W4A16, qc.W4A16_AWQ) and shape[0] % 2:
            raise InvalidArgument(f"{module} has an odd number of output features ({shape[0]}); int4 packs two per byte")
    return base


def _open(model, dtype: str):
    if hasattr(model, "plans"):
        return model, False
    from ..convert import from_hugging_face

    return from_hugging_face(model, dtype=dtype), True


def quantize_checkpoint(model, out_dir: str | os.PathLike, cfg: QuantConfig, *,
                        calibration: CalibrationSettings | None = None, progress: ProgressFn | None = None,
                        target_sm: int | str | None = None, dtype: str = "auto",
                        overwrite: bool = False) -> QuantizeSummary:
    """Quantize ``model`` (HF folder or ``HFCheckpointModel``) into ``out_dir`` atomically."""
    start = time.perf_counter()
    settings = calibration or CalibrationSettings()
    device = torch.device(settings.resolved_device)
    clock = StageClock(device)
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputExists(f"output directory already exists: {out}")
    if not out.parent.is_dir():
        raise InvalidArgument(f"parent directory of the output does not exist: {out.parent}")
    with clock.part("load"):
        model, owned = _open(model, dtype)
    try:
        sm = qc.parse_sm(target_sm)
        base = preflight_quantization(model, cfg, sm)
        mdt = TORCH_DTYPES[model.config["dtype"]]
        config = dict(model.config)
        quant = cfg.to_checkpoint_dict()
        config["quantization"] = quant
        data = None
        search = cfg.quant_algo in qc.SMOOTHQUANT and cfg.smoothquant_alpha is None
        if cfg.needs_calibration:
            with clock.part("calibration"):
                data = calibration_data(settings, getattr(model, "model_dir", None), config["vocab_size"],
                                        heldout=search)
        spec = quantized_expected(config, 0, base)  # raises on layouts that cannot exist, before writing
        record: dict = {"quant_algo": cfg.quant_algo, "kv_cache_quant_algo": cfg.kv_cache_quant_algo,
                        "group_size": cfg.group_size, "has_zero_point": cfg.has_zero_point,
                        "exclude_modules": cfg.excludes, "target_sm": sm}
        with clock.part("write"):
            writer = CheckpointDirWriter(out, spec, producer="quantize")
        try:
            layer = _LayerWriter(writer, cfg, quant, mdt, cfg.smoothquant_alpha, clock)
            if data is None:  # nothing to calibrate: one pass, quantize and write
                _write_pass(model, layer, {}, device, progress, clock, 0.0)
            elif not search:  # one pass: each layer is written as soon as it is calibrated
                _, extra = calibrate(model, cfg, data, settings, quant, mdt, progress, sink=layer, clock=clock,
                                     progress_span=1.0)
            else:  # the alpha is chosen after the last layer: calibrate, then stream again and write
                results, extra = calibrate(model, cfg, data, settings, quant, mdt, progress, clock=clock)
                layer.alpha = extra.get("smoothquant_alpha")
                _write_pass(model, layer, results, device, progress, clock, 0.85)
            if data is not None:
                record["calibration"] = data.record
                record.update(extra)
            if cfg.quant_algo == qc.FP8:
                record["fp8_weight_rounding"] = (f"gptq (block {GPTQ_BLOCK}, damp {GPTQ_DAMP}, act-order)"
                                                 if cfg.fp8_gptq else "round to nearest (max calibration)")
                if not cfg.fp8_gptq and device.type == "cuda":
                    record["calibration_matmul"] = "tf32"
            if cfg.quant_algo == qc.W4A16_AWQ:
                record.update(awq_grid=cfg.awq_grid, awq_clip=cfg.awq_clip)
            if cfg.quant_algo in qc.WEIGHT_ONLY:  # see layout.py: not TensorRT-LLM's kernel-permuted layout
                record["weight_layout"] = "row-major int8 [in, out] (W4A16: two int4 per byte along out), not permuted"
            if cfg.quant_algo in qc.SMOOTHQUANT:
                record["smoothquant_alpha"] = layer.alpha
                record["alpha_searched"] = cfg.smoothquant_alpha is None
            config["kiln_quantization"] = record
            with clock.part("write"):
                writer.finish(config)
        except BaseException:
            writer.abort()
            raise
    finally:
        if owned:
            model.close()
    if progress:
        progress(1.0, "done")
    summary = QuantizeSummary(str(out), cfg.quant_algo, cfg.kv_cache_quant_algo, time.perf_counter() - start, record)
    summary.timings = clock.record()
    return summary


# --- quantize + write ---------------------------------------------------------------------------------


class _LayerWriter:
    """Quantizes one calibrated layer on its device and writes it (the ``calibrate`` sink, and the
    second pass); globals are written as they are."""

    def __init__(self, writer: CheckpointDirWriter, cfg: QuantConfig, quant: dict, dtype: torch.dtype,
                 alpha: float | None, clock: StageClock):
        self.writer, self.cfg, self.quant, self.dtype, self.alpha, self.clock = writer, cfg, quant, dtype, alpha, clock

    def __call__(self, idx: int | None, host: dict[str, torch.Tensor], t: dict[str, torch.Tensor],
                 res: LayerResult | None) -> None:
        if idx is None:
            with self.clock.part("write"):
                for k, v in host.items():
                    self.writer.put(k, v)
            return
        with self.clock.part("quantize"):
            qt = quantize_layer(t, idx, res or LayerResult(), self.cfg, self.quant, self.dtype, self.alpha)
        prefix = f"transformer.layers.{idx}."
        with self.clock.part("write"):
            for k, v in qt.items():
                if prefix + k in self.writer.expected:
                    self.writer.put(prefix + k, v.cpu())


def _write_pass(model, layer: _LayerWriter, results: dict[int, LayerResult], device: torch.device,
                progress: ProgressFn | None, clock: StageClock, progress_from: float) -> None:
    """Stream the float checkpoint and quantize each layer on ``device`` (the calibration device: the
    GPU when there is one; the same IEEE rounding as on the CPU) with its calibration ``results``."""
    n_layers = model.config["num_hidden_layers"]
    for idx, host in stream_layers(clock.timed("load", model.tensors(0))):
        if idx is None:
            layer(None, host, host, None)
            continue
        with clock.part("load"):
            t = {k: v.to(device) for k, v in host.items()}
            res = _result_on(results.get(idx, LayerResult()), device)
        layer(idx, host, t, res)
        if progress:
            progress(progress_from + (1.0 - progress_from) * (idx + 1) / n_layers, f"wrote layer {idx + 1}/{n_layers}")


class CheckpointDirWriter:
    """``config.json`` + ``rank0.safetensors`` sized from ``spec``, assembled in a temporary directory
    beside ``out``: every tensor put must match the spec's shape and dtype, every spec tensor must be
    put before ``finish`` (which writes ``config.json`` and renames the directory into place);
    ``abort`` removes the temporary directory."""

    def __init__(self, out: Path, spec, *, producer: str):
        from ..version import __version__

        self.out, self.producer = out, producer
        self.expected = {n: (s, d) for n, s, d in spec}
        self.written: set[str] = set()
        self.tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        try:
            self.w = SafetensorsWriter(self.tmp / "rank0.safetensors", [(n, dtype_name(d), s) for n, s, d in spec],
                                       metadata={"format": "pt", "producer": f"kiln {__version__} {producer}"})
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def put(self, name: str, t: torch.Tensor) -> None:
        if name not in self.expected:
            raise InvalidCheckpoint(f"{self.producer} produced {name}, which the layout does not list")
        shape, dt = self.expected[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dt:
            raise InvalidCheckpoint(f"{self.producer} produced {name} {list(t.shape)} {t.dtype}, "
                                    f"layout says {list(shape)} {dt}")
        self.w.write(name, 0, t.contiguous())
        self.written.add(name)

    def finish(self, config: dict) -> None:
        self.w.close()
        missing = sorted(set(self.expected) - self.written)
        if missing:
            raise InvalidCheckpoint(f"{self.producer} did not produce {len(missing)} tensors, e.g. {missing[:3]}")
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        publish_dir(self.tmp, self.out)

    def abort(self) -> None:
        self.w.close(fsync=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_checkpoint_dir(out: Path, config: dict, spec, named: Iterator[tuple[str, torch.Tensor]], *,
                         producer: str) -> None:
    """Write ``config.json`` + ``rank0.safetensors`` sized from ``spec``; every produced tensor must match the
    spec's shape and dtype and every spec tensor must be produced. Atomic: temp dir + rename."""
    writer = CheckpointDirWriter(out, spec, producer=producer)
    try:
        for name, t in named:
            writer.put(name, t)
        writer.finish(config)
    except BaseException:
        writer.abort()
        raise


__all__ = ["CheckpointDirWriter", "QuantizeSummary", "StageClock", "preflight_quantization", "quantize_checkpoint",
           "write_checkpoint_dir"]

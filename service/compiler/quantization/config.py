"""``QuantConfig``: TensorRT-LLM's ``quantization`` fields and algo names, plus the checks Kiln runs
before any work starts (algo/arch combinations, target GPU, group size).

    cfg = QuantConfig(quant_algo="W4A16_AWQ", kv_cache_quant_algo="INT8", exclude_modules=["*.0.mlp.proj"])
    cfg.to_checkpoint_dict()   # the ``quantization`` object written into config.json
    cfg.is_excluded("transformer.layers.0.mlp.proj")   # True; lm_head / vocab_embedding always are

TensorRT-LLM *replaces* its default ``exclude_modules`` when a list is given (trtllm.md §1.5), so the
defaults are always written out together with the user's patterns.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ..errors import InvalidArgument

FP8 = "FP8"
FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
W8A16 = "W8A16"
W4A16 = "W4A16"
W4A16_AWQ = "W4A16_AWQ"
W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
INT8 = "INT8"

QUANT_ALGOS = (FP8, FP8_PER_CHANNEL_PER_TOKEN, W8A16, W4A16, W4A16_AWQ, W8A8_SQ_PER_CHANNEL,
               W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN)
KV_CACHE_ALGOS = (INT8, FP8)
WEIGHT_ONLY = (W8A16, W4A16)
SMOOTHQUANT = (W8A8_SQ_PER_CHANNEL, W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN)
FP8_ALGOS = (FP8, FP8_PER_CHANNEL_PER_TOKEN)
# TensorRT-LLM's ``_requires_calibration``: everything but RTN weight-only and dynamic FP8, plus any KV quant.
NO_CALIBRATION = (W8A16, W4A16, FP8_PER_CHANNEL_PER_TOKEN)

DEFAULT_EXCLUDES = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                    "*shared_expert_gate")
ALIASES = {  # ModelOpt / quantize.py qformat names -> TensorRT-LLM QuantAlgo
    "fp8": FP8, "fp8_per_channel_per_token": FP8_PER_CHANNEL_PER_TOKEN, "int8_wo": W8A16, "int4_wo": W4A16,
    "int4_awq": W4A16_AWQ, "int8_sq": W8A8_SQ_PER_CHANNEL,
}
FP8_MIN_SM = 89  # E4M3 tensor cores: Ada (8.9) and Hopper (9.0) onwards
NEMOTRON_NAS = "DeciLMForCausalLM"
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
# FP8 calibration methods: "gptq" (the default) = max-calibrated scales + GPTQ-rounded E4M3 weights;
# "max" = ModelOpt's plain max calibration (weights rounded to nearest): the fast path.
CALIBRATION_METHODS = ("gptq", "max")


def canonical_algo(name: str | None, allowed: tuple[str, ...], what: str) -> str | None:
    if name is None or name == "" or str(name).upper() in ("NONE", "NO_QUANT"):
        return None
    algo = ALIASES.get(str(name), str(name).upper())
    if algo not in allowed:
        raise InvalidArgument(f"unknown {what} {name!r}", hint=f"choose one of: {', '.join(allowed)}")
    return algo


@dataclass
class QuantConfig:
    """TensorRT-LLM ``QuantConfig`` fields (the six every release understands) plus Kiln's search knobs."""

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int = 128
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: list[str] | None = None  # user patterns, ADDED to DEFAULT_EXCLUDES
    # Kiln-only (recorded in the checkpoint's ``kiln_quantization``, never in ``quantization``):
    smoothquant_alpha: float | None = None  # None: per-model search over ``alpha_grid``
    alpha_grid: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
    awq_grid: int = 20
    awq_clip: bool = True  # the original AWQ per-group clip search (ModelOpt's awq_lite skips it)
    kv_clip_search: bool = True  # INT8 KV: search the shared K/V scale's clip (False: amax/127 as TensorRT-LLM)
    fp8_gptq: bool = True  # FP8: GPTQ-rounded E4M3 weights (False: ModelOpt's plain max calibration, round to nearest)
    # FP8 only: "gptq" or "max" (the fast path); sets ``fp8_gptq``. None: keep ``fp8_gptq`` (GPTQ by default)
    calibration_method: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.quant_algo = canonical_algo(self.quant_algo, QUANT_ALGOS, "quantization algorithm")
        self.kv_cache_quant_algo = canonical_algo(self.kv_cache_quant_algo, KV_CACHE_ALGOS,
                                                  "KV cache quantization")
        if self.quant_algo == W4A16_AWQ:
            self.pre_quant_scale = True
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise InvalidArgument(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.has_zero_point and self.quant_algo != W4A16_AWQ:
            raise InvalidArgument(f"has_zero_point is only supported with {W4A16_AWQ}, not {self.quant_algo}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise InvalidArgument(f"smoothquant alpha must be in [0, 1], got {self.smoothquant_alpha}")
        if any(not 0.0 <= a <= 1.0 for a in self.alpha_grid) or not self.alpha_grid:
            raise InvalidArgument(f"alpha grid must be non-empty values in [0, 1], got {self.alpha_grid}")
        if self.calibration_method is not None:
            method = str(self.calibration_method).lower()
            if method not in CALIBRATION_METHODS:
                raise InvalidArgument(f"unknown calibration method {self.calibration_method!r}",
                                      hint=f"choose one of: {', '.join(CALIBRATION_METHODS)}")
            if self.quant_algo != FP8:
                raise InvalidArgument(
                    f"calibration method {method!r} applies to FP8 only, not {self.quant_algo or 'no quantization'}",
                    hint="leave the calibration method unset for other algorithms (each has its own calibration)")
            self.calibration_method = method
            self.fp8_gptq = method == "gptq"

    @property
    def fp8_calibration_method(self) -> str | None:
        """"gptq" or "max" for FP8, else None."""
        return ("gptq" if self.fp8_gptq else "max") if self.quant_algo == FP8 else None

    @property
    def enabled(self) -> bool:
        return bool(self.quant_algo or self.kv_cache_quant_algo)

    @property
    def needs_calibration(self) -> bool:
        return bool(self.kv_cache_quant_algo) or (self.quant_algo is not None and self.quant_algo not in NO_CALIBRATION)

    @property
    def excludes(self) -> list[str]:
        out = list(DEFAULT_EXCLUDES)
        for p in self.exclude_modules or []:
            if p not in out:
                out.append(p)
        return out

    def is_excluded(self, module: str) -> bool:
        return is_excluded(module, self.excludes)

    def to_checkpoint_dict(self) -> dict:
        return {
            "quant_algo": self.quant_algo,
            "kv_cache_quant_algo": self.kv_cache_quant_algo,
            "group_size": self.group_size,
            "has_zero_point": self.has_zero_point,
            "pre_quant_scale": self.pre_quant_scale,
            "exclude_modules": self.excludes if self.quant_algo else None,
        }

    @classmethod
    def from_checkpoint_dict(cls, q: dict | None) -> QuantConfig:
        q = q or {}
        excl = q.get("exclude_modules")
        return cls(quant_algo=q.get("quant_algo"), kv_cache_quant_algo=q.get("kv_cache_quant_algo"),
                   group_size=int(q.get("group_size") or 128), has_zero_point=bool(q.get("has_zero_point")),
                   pre_quant_scale=bool(q.get("pre_quant_scale")),
                   exclude_modules=[p for p in excl if p not in DEFAULT_EXCLUDES] if excl else None)


def is_excluded(module: str, patterns: list[str] | tuple[str, ...] | None) -> bool:
    """TensorRT-LLM semantics: fnmatch on the module name; ``None`` means the defaults."""
    pats = DEFAULT_EXCLUDES if patterns is None else patterns
    return any(fnmatch.fnmatchcase(module, p) for p in pats)


def parse_sm(target: str | int | float | None) -> int | None:
    """'sm_89', '8.9', 89, 9.0 -> 89 / 90; None stays None (target unknown)."""
    if target is None:
        return None
    s = str(target).lower().removeprefix("sm_").removeprefix("sm")
    try:
        if "." in s:
            major, minor = s.split(".", 1)
            return int(major) * 10 + int(minor)
        v = int(s)
    except ValueError as exc:
        raise InvalidArgument(f"cannot read a GPU compute capability from {target!r}",
                              hint="use e.g. sm_89, 8.9 or 90") from exc
    return v * 10 if v < 10 else v


def check_combination(qc: QuantConfig, architecture: str, target_sm: int | None = None) -> None:
    """Refuse what TensorRT-LLM refuses (or the target GPU cannot run) before any work starts."""
    if not qc.enabled:
        return
    if architecture in MOE_ARCHITECTURES:
        what = qc.quant_algo or f"{qc.kv_cache_quant_algo} KV cache"
        raise InvalidArgument(
            f"{what} is not supported for Mixture-of-Experts models ({architecture}) yet: Kiln's quantizer, "
            "quantized reference and engine do not handle stacked expert weights",
            hint="convert without --quantization / --kv-cache-quantization (float16 / bfloat16 experts)")
    if architecture == NEMOTRON_NAS and qc.quant_algo in WEIGHT_ONLY + SMOOTHQUANT:
        raise InvalidArgument(
            f"{qc.quant_algo} is not supported for Nemotron-NAS ({NEMOTRON_NAS}); TensorRT-LLM refuses it",
            hint="use FP8 or W4A16_AWQ for Nemotron-NAS models")
    needs_fp8 = qc.quant_algo in FP8_ALGOS or qc.kv_cache_quant_algo == FP8
    if needs_fp8 and target_sm is not None and target_sm < FP8_MIN_SM:
        what = qc.quant_algo if qc.quant_algo in FP8_ALGOS else "FP8 KV cache"
        raise InvalidArgument(
            f"{what} needs a GPU with compute capability >= 8.9 (Ada/Hopper); the target is "
            f"sm_{target_sm}", hint="use W8A8_SQ_PER_CHANNEL, W8A16 or W4A16_AWQ (and an INT8 KV cache) on this GPU")

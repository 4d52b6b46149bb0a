"""JobSpec: what a user asks for. Validated here, once, for REST, gRPC, the CLI and the dashboard.

The model source is a Hugging Face repo id (``model``, or ``source: {"kind": "hf", "repo": ...}``),
or a Meta consolidated folder / GGUF file on the service's shared storage (``source: {"kind":
"meta" | "gguf", "path": ...}``, a plain relative path under ``KILN_SOURCES_DIR``; the workers
resolve it and refuse anything that leaves that root). Never a URL or an arbitrary server path: no
SSRF, no reads outside the HF cache and the sources root. ``normalized()`` is the canonical form the
idempotency check and the stage keys hash (an ``hf`` source is folded into ``model``/``revision``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")
SOURCE_PATH_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")
LABEL_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,62}$")
TARGET_RE = re.compile(r"^(cpu|sm\d{2,3})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MappingSpec(_Strict):
    tp_size: int = Field(1, ge=1, le=64, description="tensor-parallel ranks")
    pp_size: int = Field(1, ge=1, le=64, description="pipeline-parallel stages")
    pp_split: Literal["even", "balanced"] = Field(
        "even", description="pipeline stages: TensorRT-LLM's even split, or Kiln's cost-balanced split "
        "(weight bytes, FLOPs and KV-cache bytes per layer; Kiln's engine only)")
    moe_ep_size: int | None = Field(
        None, ge=1, le=64, description="Mixture-of-Experts models: expert parallelism inside the tp ranks "
        "(TensorRT-LLM's moe_ep_size, dividing tp_size and the expert count); unset: every rank holds a slice "
        "of every expert")


class CalibrationSpec(_Strict):
    """Calibration data for the quantizer (FP8, AWQ, SmoothQuant, any KV cache quantization)."""

    dataset: Literal["bundled"] = Field("bundled", description="'bundled': the text set shipped with Kiln")
    samples: int = Field(64, ge=1, le=4096, description="calibration windows")
    seq_len: int = Field(256, ge=16, le=8192, description="tokens per window")


class ThresholdsSpec(_Strict):
    """Pass/fail bounds of the accuracy report (quantized checkpoint vs the unquantized model).

    Defaults are the quantizer's (``service.compiler.quantization.report.Thresholds``): loose
    "catch garbage" bounds for small models. A failing report fails the job (accuracy_below_threshold)."""

    max_perplexity_increase_pct: float = Field(10.0, ge=0.0)
    min_top1_agreement: float = Field(0.80, ge=0.0, le=1.0)
    max_kl_divergence: float = Field(0.25, ge=0.0)
    min_rouge_l: float = Field(0.30, ge=0.0, le=1.0)


# TensorRT-LLM's QuantAlgo names, and the names this API accepted before (kept as aliases).
QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A16", "W4A16", "W4A16_AWQ", "W8A8_SQ_PER_CHANNEL",
               "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN")
KV_CACHE_ALGOS = ("INT8", "FP8")
ALGO_ALIASES = {
    "fp8": "FP8", "int8_weight_only": "W8A16", "int4_weight_only": "W4A16", "w4a16_awq": "W4A16_AWQ",
    "smoothquant": "W8A8_SQ_PER_CHANNEL",
    # ModelOpt / quantize.py qformat names
    "int8_wo": "W8A16", "int4_wo": "W4A16", "int4_awq": "W4A16_AWQ", "int8_sq": "W8A8_SQ_PER_CHANNEL",
}
FP8_MIN_SM = 89


def _canonical(value: str, allowed: tuple[str, ...], aliases: dict[str, str], what: str) -> str:
    if value is None or str(value).strip().lower() in ("", "none"):
        return "none"
    v = str(value).strip()
    v = aliases.get(v.lower(), v.upper())
    if v not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose none or one of {', '.join(allowed)}")
    return v


class QuantizationSpec(_Strict):
    algo: str = Field("none", description="TensorRT-LLM QuantAlgo name: " + ", ".join(QUANT_ALGOS)
                      + " (or none); the older lowercase names fp8, int8_weight_only, int4_weight_only, "
                      "w4a16_awq, smoothquant are aliases", examples=["W8A16"])
    kv_cache: str = Field("none", description="KV cache quantization: INT8, FP8 or none")
    group_size: int = Field(128, ge=1, le=8192, description="W4A16_AWQ group size (must divide every input dimension)")
    has_zero_point: bool = Field(False, description="W4A16_AWQ only")
    exclude_modules: list[str] | None = Field(None, description="patterns added to the default exclusions (lm_head, ...)")
    smoothquant_alpha: float | None = Field(None, ge=0.0, le=1.0, description="None: per-model search")
    calibration_method: Literal["gptq", "max"] | None = Field(
        None, description="FP8 only. gptq (the default when unset): max-calibrated scales and GPTQ-rounded E4M3 "
        "weights, the accurate one; max: ModelOpt's plain max calibration, weights rounded to nearest (the fast "
        "path: several times quicker, less accurate)")
    calibration: CalibrationSpec | None = None
    thresholds: ThresholdsSpec = Field(default_factory=ThresholdsSpec)

    @field_validator("algo", mode="before")
    @classmethod
    def _algo(cls, v):
        return _canonical(v, QUANT_ALGOS, ALGO_ALIASES, "quantization algo")

    @field_validator("kv_cache", mode="before")
    @classmethod
    def _kv(cls, v):
        return _canonical(v, KV_CACHE_ALGOS, {}, "kv_cache quantization")

    @field_validator("exclude_modules")
    @classmethod
    def _excl(cls, v):
        if v is not None and (len(v) > 64 or any(not p or len(p) > 200 for p in v)):
            raise ValueError("exclude_modules: at most 64 non-empty patterns of at most 200 characters")
        return v

    @model_validator(mode="after")
    def _combination(self) -> QuantizationSpec:
        if self.has_zero_point and self.algo != "W4A16_AWQ":
            raise ValueError(f"has_zero_point is only supported with W4A16_AWQ, not {self.algo}")
        if self.smoothquant_alpha is not None and self.algo != "W8A8_SQ_PER_CHANNEL":
            raise ValueError("smoothquant_alpha applies to W8A8_SQ_PER_CHANNEL only")
        if self.calibration_method is not None and self.algo != "FP8":
            raise ValueError(f"calibration_method applies to FP8 only, not {self.algo}")
        return self

    @property
    def requested(self) -> bool:
        return self.algo != "none" or self.kv_cache != "none"

    @property
    def needs_fp8(self) -> bool:
        return self.algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN") or self.kv_cache == "FP8"


class BuildSpec(_Strict):
    backend: Literal["torch", "onnx", "tensorrt", "trtllm"] = "torch"
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_input_len: int | None = Field(
        None, ge=1, le=131072, description="longest prompt; unset: min(1024, max_seq_len) (as kiln build / "
        "trtllm-build derive it). An explicit value beyond the model's max_position_embeddings is a 422")
    max_seq_len: int | None = Field(
        None, ge=1, le=131072, description="prompt + generated tokens; unset: min(max_position_embeddings, "
        "max_input_len + 1024), from the model. An explicit value beyond max_position_embeddings is a 422")
    target: str = Field("cpu", description="'cpu' or a GPU architecture such as 'sm90'")

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if not TARGET_RE.match(v):
            raise ValueError("target must be 'cpu' or an SM version such as 'sm80', 'sm90'")
        return v

    @model_validator(mode="after")
    def _lengths(self) -> BuildSpec:
        if self.max_input_len is not None and self.max_seq_len is not None and self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len={self.max_input_len} exceeds max_seq_len={self.max_seq_len}")
        return self

    @property
    def target_sm(self) -> int | None:
        return None if self.target == "cpu" else int(self.target[2:])


EvaluationMetric = Literal["perplexity", "agreement", "kl", "rouge"]
EVALUATION_METRICS: tuple[EvaluationMetric, ...] = ("perplexity", "agreement", "kl", "rouge")


class EvaluationSpec(_Strict):
    """Engine (or quantized checkpoint) against the reference runtime on held-out windows."""

    metrics: list[EvaluationMetric] = Field(default_factory=lambda: list(EVALUATION_METRICS))
    max_samples: int = Field(8, ge=1, le=10000, description="evaluation windows")
    seq_len: int = Field(128, ge=8, le=8192, description="tokens per evaluation window")
    max_new_tokens: int = Field(16, ge=1, le=1024, description="greedy tokens generated per prompt (ROUGE)")
    min_rouge1: float | None = Field(None, ge=0.0, le=1.0,
                                     description="engine vs reference ROUGE-1 floor (None: reported only)")
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0,
                                             description="engine vs reference top-1 agreement floor (None: reported only)")


class SourceSpec(_Strict):
    """Where the model comes from: a Hugging Face repo, or files on the service's shared storage."""

    kind: Literal["hf", "meta", "gguf"] = Field(
        "hf", description="hf: a Hugging Face repo id; meta: a folder of Meta consolidated.NN.pth shards + "
        "params.json; gguf: one llama.cpp .gguf file")
    repo: str | None = Field(None, description="hf only: the repo id", examples=["HuggingFaceTB/SmolLM2-135M-Instruct"])
    revision: str | None = Field(None, description="hf only: branch, tag or commit")
    path: str | None = Field(None, description="meta / gguf only: path relative to the service's sources root "
                             "(KILN_SOURCES_DIR, default <storage>/sources); plain names joined by '/', no '..'",
                             examples=["smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"])

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.split("/")
        if len(v) > 512 or len(parts) > 16 or not all(SOURCE_PATH_PART_RE.match(p) for p in parts):
            raise ValueError("source.path must be a relative path of plain names (letters, digits, '._+-', not "
                             "starting with '.') joined by '/', inside the service's sources root")
        return v

    @model_validator(mode="after")
    def _fields(self) -> SourceSpec:
        if self.kind == "hf":
            if not self.repo or self.path is not None:
                raise ValueError("source kind 'hf' takes 'repo' (and optionally 'revision'), not 'path'")
            if not REPO_ID_RE.match(self.repo) or ".." in self.repo:
                raise ValueError("source.repo must be a Hugging Face repo id such as 'org/name'")
            if self.revision is not None and (not REVISION_RE.match(self.revision) or ".." in self.revision):
                raise ValueError("source.revision must be a branch, tag or commit sha")
        else:
            if not self.path or self.repo is not None or self.revision is not None:
                raise ValueError(f"source kind {self.kind!r} takes 'path' only")
            if self.kind == "gguf" and not self.path.lower().endswith(".gguf"):
                raise ValueError("a gguf source.path must name a .gguf file")
        return self


class JobSpec(_Strict):
    model: str | None = Field(None, description="Hugging Face repo id (the default source); with a meta/gguf "
                              "'source', a display name (default: '<kind>/<file or folder name>')",
                              examples=["HuggingFaceTB/SmolLM2-135M-Instruct"])
    source: SourceSpec | None = Field(None, description="the model source when it is not the Hugging Face repo "
                                      "in 'model': {kind: hf, repo, revision} | {kind: meta | gguf, path}")
    revision: str | None = Field(None, description="branch, tag or commit; default main")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    mapping: MappingSpec = Field(default_factory=MappingSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    build: BuildSpec | None = None
    evaluation: EvaluationSpec | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    webhook_url: str | None = Field(None, description="https URL notified on completion (HMAC signed)")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "dtype": "bfloat16",
                    "mapping": {"tp_size": 1, "pp_size": 1},
                    "labels": {"team": "search"},
                }
            ]
        },
    )

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        if v is not None and (not REPO_ID_RE.match(v) or ".." in v):
            raise ValueError("model must be a Hugging Face repo id such as 'org/name' (no URLs or paths)")
        return v

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        if v is not None and (not REVISION_RE.match(v) or ".." in v):
            raise ValueError("revision must be a branch, tag or commit sha")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 16:
            raise ValueError("at most 16 labels")
        for key, value in v.items():
            if not LABEL_KEY_RE.match(key):
                raise ValueError(f"label key {key!r} must match {LABEL_KEY_RE.pattern}")
            if len(value) > 128:
                raise ValueError(f"label {key!r} value is longer than 128 characters")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("webhook_url must be an http(s) URL")
        if parts.username or parts.password:
            raise ValueError("webhook_url must not carry credentials")
        return v

    @model_validator(mode="after")
    def _source(self) -> JobSpec:
        src = self.source
        if src is None:
            if self.model is None:
                raise ValueError("give 'model' (a Hugging Face repo id) or 'source'")
        elif src.kind == "hf":  # canonical form: the repo in model/revision, no source object
            if self.model is not None and self.model != src.repo:
                raise ValueError(f"model {self.model!r} and source.repo {src.repo!r} disagree")
            if self.revision is not None and src.revision is not None and self.revision != src.revision:
                raise ValueError("revision and source.revision disagree")
            self.model, self.revision, self.source = src.repo, self.revision or src.revision, None
        else:
            if self.revision is not None:
                raise ValueError(f"revision applies to Hugging Face repos, not to a {src.kind} source")
            if self.model is None:
                name = re.sub(r"[^A-Za-z0-9._-]", "-", (src.path or "").rsplit("/", 1)[-1]).lstrip("._-")[:80]
                self.model = f"{src.kind}/{name or 'model'}"
        return self

    @property
    def is_local_source(self) -> bool:
        """A Meta / GGUF source on the shared storage (not a Hugging Face repo)."""
        return self.source is not None and self.source.kind != "hf"

    @model_validator(mode="after")
    def _sections(self) -> JobSpec:
        q = self.quantization
        if q.requested and self.mapping.tp_size * self.mapping.pp_size != 1:
            raise ValueError("quantization runs at tp_size=1, pp_size=1 (Kiln quantizes the whole model, then "
                             "shards); submit the quantized job with mapping tp_size=1, pp_size=1")
        if q.needs_fp8 and self.build is not None and self.build.target_sm is not None \
                and self.build.target_sm < FP8_MIN_SM:
            what = q.algo if q.algo.startswith("FP8") else "an FP8 KV cache"
            raise ValueError(f"{what} needs a GPU with compute capability >= 8.9 (Ada/Hopper); build.target is "
                             f"{self.build.target}: use W8A16, W4A16_AWQ or W8A8_SQ_PER_CHANNEL (INT8 KV cache) there")
        if self.evaluation is not None and self.build is None and not q.requested:
            raise ValueError("evaluation measures a built engine or a quantized checkpoint: add 'build' and/or "
                             "'quantization', or drop 'evaluation'")
        return self

    def normalized(self) -> dict:
        out = self.model_dump(mode="json")
        if out.get("source") is None:  # specs without a source hash as they did before sources existed
            out.pop("source", None)
        return out

    def digest(self) -> str:
        canonical = json.dumps(self.normalized(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def queue(self) -> str:
        """The capability queue that can serve this job: GPU builds go to build.<sm>."""
        if self.build is not None and self.build.target != "cpu":
            return f"build.{self.build.target}"
        return "cpu"


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_private_host(host: str) -> bool:
    """True for anything but a globally routable address (webhook SSRF guard): loopback, RFC 1918, link-local,
    ULA, CGNAT (100.64/10: cloud metadata lives there too), benchmarking, reserved, multicast, unspecified, and
    IPv6 forms that carry such an IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64); names
    ``localhost`` / ``*.localhost`` / ``*.internal`` (any case, trailing dot or not)."""
    host = host.strip().rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is link-local anyway
    except ValueError:
        return host == "localhost" or host.endswith((".localhost", ".internal", ".local"))
    embedded: list[ipaddress.IPv4Address] = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            embedded.append(ip.ipv4_mapped)
        if ip.sixtofour:
            embedded.append(ip.sixtofour)
        if ip.teredo:
            embedded.extend(ip.teredo)
        if ip in NAT64 or int(ip) >> 32 == 0:  # NAT64 well-known prefix, IPv4-compatible ::a.b.c.d
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return any(not a.is_global or a.is_multicast for a in (ip, *embedded))

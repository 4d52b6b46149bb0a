"""JobSpec: what a user asks for. Validated here, once, for REST, gRPC, the CLI and the dashboard.

Only a Hugging Face repo id is accepted as the model source (never a URL or a server path: no SSRF,
no reads outside the HF cache). ``normalized()`` is the canonical form the idempotency check and
the stage keys hash.
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
LABEL_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,62}$")
TARGET_RE = re.compile(r"^(cpu|sm\d{2,3})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MappingSpec(_Strict):
    tp_size: int = Field(1, ge=1, le=64, description="tensor-parallel ranks")
    pp_size: int = Field(1, ge=1, le=64, description="pipeline-parallel stages")


class CalibrationSpec(_Strict):
    dataset: Literal["bundled"] = "bundled"
    samples: int = Field(64, ge=1, le=4096)
    seq_len: int = Field(256, ge=16, le=8192)


class QuantizationSpec(_Strict):
    algo: Literal["none", "fp8", "int8_weight_only", "int4_weight_only", "w4a16_awq", "smoothquant"] = "none"
    kv_cache: Literal["none", "fp8", "int8"] = "none"
    calibration: CalibrationSpec | None = None

    @property
    def requested(self) -> bool:
        return self.algo != "none" or self.kv_cache != "none"


class BuildSpec(_Strict):
    backend: Literal["torch", "onnx", "tensorrt", "trtllm"] = "torch"
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_input_len: int = Field(1024, ge=1, le=131072)
    max_seq_len: int = Field(2048, ge=1, le=131072)
    target: str = Field("cpu", description="'cpu' or a GPU architecture such as 'sm90'")

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if not TARGET_RE.match(v):
            raise ValueError("target must be 'cpu' or an SM version such as 'sm80', 'sm90'")
        return v

    @model_validator(mode="after")
    def _lengths(self) -> BuildSpec:
        if self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len={self.max_input_len} exceeds max_seq_len={self.max_seq_len}")
        return self


class EvaluationSpec(_Strict):
    metrics: list[Literal["perplexity", "agreement", "kl", "rouge"]] = Field(default_factory=lambda: ["perplexity"])
    max_samples: int = Field(32, ge=1, le=10000)


class JobSpec(_Strict):
    model: str = Field(..., description="Hugging Face repo id", examples=["HuggingFaceTB/SmolLM2-135M-Instruct"])
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
    def _model(cls, v: str) -> str:
        if not REPO_ID_RE.match(v) or ".." in v:
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

    def normalized(self) -> dict:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        canonical = json.dumps(self.normalized(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def queue(self) -> str:
        """The capability queue that can serve this job: GPU builds go to build.<sm>."""
        if self.build is not None and self.build.target != "cpu":
            return f"build.{self.build.target}"
        return "cpu"


def is_private_host(host: str) -> bool:
    """True for loopback, RFC1918, link-local, ULA and similar addresses (webhook SSRF guard)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost" or host.endswith(".localhost") or host.endswith(".internal")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified

"""Reading HF ``config.json`` fields across transformers versions (4.x ``rope_scaling``/``rope_theta``/
``torch_dtype`` and 5.x ``rope_parameters``/``dtype``)."""

from __future__ import annotations

from ..errors import InvalidArgument

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(rotary_base, rotary_scaling) with both ``type`` and ``rope_type`` written, or None."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            scaling = None
        else:
            scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}
            scaling["rope_type"] = kind
            scaling["type"] = kind  # older trtllm-build reads 'type', newer 'rope_type'
    elif scaling is not None:
        raise InvalidArgument(f"rope_scaling must be an object, got {scaling!r}")
    return float(theta if theta is not None else 10000.0), scaling


def hf_dtype(hf: dict) -> str | None:
    value = hf.get("torch_dtype") or hf.get("dtype")
    if isinstance(value, str):
        return DTYPE_ALIASES.get(value.replace("torch.", ""))
    return None


def resolve_dtype(requested: str, hf: dict) -> str:
    """``auto`` takes the model's own dtype (float16 when it states none, as TensorRT-LLM does)."""
    if requested == "auto":
        return hf_dtype(hf) or "float16"
    if requested not in DTYPE_ALIASES:
        raise InvalidArgument(
            f"unknown dtype {requested!r}", hint="use float32, float16, bfloat16 or auto"
        )
    return DTYPE_ALIASES[requested]


def base_quantization() -> dict:
    # Only the keys the oldest supported TensorRT-LLM QuantConfig understands.
    return {
        "quant_algo": None,
        "kv_cache_quant_algo": None,
        "group_size": 128,
        "has_zero_point": False,
        "pre_quant_scale": False,
        "exclude_modules": None,
    }

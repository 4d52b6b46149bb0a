"""Reading HF ``config.json`` fields across transformers versions (4.x ``rope_scaling``/``rope_theta``/
``torch_dtype`` and 5.x ``rope_parameters``/``dtype``)."""

from __future__ import annotations

import math

from ..errors import InvalidArgument

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


# Size fields of the architectures Kiln reads, with generous upper bounds (the largest public models stay far
# below them). A value outside is refused before any plan, list or tensor is sized from it: a config.json that
# says num_hidden_layers=10**12 must cost nothing.
SIZE_BOUNDS: dict[str, int] = {
    "hidden_size": 1 << 17, "n_embd": 1 << 17, "word_embed_proj_dim": 1 << 17,
    "intermediate_size": 1 << 20, "n_inner": 1 << 20, "ffn_dim": 1 << 20,
    "num_hidden_layers": 1 << 12, "n_layer": 1 << 12,
    "num_attention_heads": 1 << 12, "n_head": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
    "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 27, "n_positions": 1 << 27, "n_ctx": 1 << 27,
}
POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_epsilon")
CONFIG_HINT = "config.json is not a real model configuration: fix the value or use the model's published config"


def check_hf_config(hf: dict) -> dict:
    """Refuse size fields that are not integers in [1, bound] and float fields that are not finite positive
    numbers (``null`` means "unset" and is left to the architecture's default). Nothing is sized from the
    config before this passes."""
    for key, bound in SIZE_BOUNDS.items():
        value = hf.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"config.json: {key}={value!r:.60} is not an integer", hint=CONFIG_HINT)
        if not 1 <= value <= bound:
            raise InvalidArgument(f"config.json: {key}={value} is outside [1, {bound}]", hint=CONFIG_HINT)
    for key in POSITIVE_FLOATS:
        value = hf.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidArgument(f"config.json: {key}={value!r:.60} is not a finite positive number", hint=CONFIG_HINT)
    return hf


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
            for k, v in scaling.items():
                if not isinstance(v, bool) and isinstance(v, (int, float)) and not (math.isfinite(v) and v > 0):
                    raise InvalidArgument(f"config.json: rope scaling {k}={v!r} is not a finite positive number",
                                          hint=CONFIG_HINT)
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

"""A weight-only quantized checkpoint back in its float dtype, with the weights the engine multiplies by.

For a backend that builds float checkpoints only (onnx today): the engine then holds exactly the
weights a weight-only engine would dequantize (``qlinear.dequantize_weight``), in the checkpoint's
float dtype. The worker's build stage takes this path when ``validate_build`` refuses the quantized
checkpoint, so it steps aside once the backend gains support.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint.safetensors_io import SafetensorsFile
from .layout import linear_module
from .qlinear import FLOAT_DTYPES, QUANT_PARAM_SUFFIXES, dequantize_weight


def dequantize_checkpoint(src: Path, dst: Path) -> str | None:
    """A float world-size-1 checkpoint in ``dst`` with the weights a weight-only engine multiplies by;
    returns the quant algo it came from (``config.json`` records it as ``kiln_dequantized_from``)."""
    src, dst = Path(src), Path(dst)
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


__all__ = ["dequantize_checkpoint"]

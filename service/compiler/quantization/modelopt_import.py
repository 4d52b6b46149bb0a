"""Import NVIDIA ModelOpt's HF-like export (``export_hf_checkpoint``: HF names plus ``hf_quant_config.json``,
as Megatron-LM's ModelOpt post-training example produces) into Kiln's TensorRT-LLM checkpoint.

    import_modelopt_export("./llama-fp8-modelopt", "./ckpt-fp8")

Supported: ``FP8`` (per-tensor E4M3 ``weight`` + ``weight_scale`` + ``input_scale``) and the FP8 KV cache
(``k_proj.k_scale`` / ``v_proj.v_scale``), on the Llama family (Llama, Mistral, Qwen2). The export
scales q, k and v separately; TensorRT-LLM's fused qkv has one weight scale, so the three are
requantized to their common maximum (the larger scale never saturates) and share the largest input
scale; K and V share ``kv_cache_scaling_factor`` = max(k_scale, v_scale). Linears the export left in
16 bits are written unquantized and named in ``exclude_modules``. Other algos are refused up front.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import InvalidArgument, InvalidCheckpoint, OutputExists, UnsupportedArchitecture
from ..models.base import TableArch, resolve_name
from ..source import read_json
from .config import FP8, QuantConfig
from .decoder import LLAMA_ARCHS
from .fp8 import to_fp8
from .layout import linear_module, quantized_expected
from .quantize import write_checkpoint_dir

SUPPORTED = (FP8,)


def _scalar(source, name: str) -> torch.Tensor:
    return source.view(name).float().reshape(-1).max().reshape(1)


def import_modelopt_export(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "auto",
                           overwrite: bool = False) -> Path:
    from ..convert import from_hugging_face

    src, out = Path(src_dir), Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputExists(f"output directory already exists: {out}")
    if not (src / "hf_quant_config.json").is_file():
        raise InvalidArgument(f"{src} is not a ModelOpt HF export (no hf_quant_config.json)")
    meta = read_json(src / "hf_quant_config.json", "hf_quant_config.json")
    q = meta.get("quantization") or {}
    algo, kv = q.get("quant_algo"), q.get("kv_cache_quant_algo")
    if algo not in (None, *SUPPORTED) or kv not in (None, FP8):
        raise InvalidArgument(f"ModelOpt export with quant_algo={algo}, kv_cache_quant_algo={kv} cannot be imported",
                              hint="supported: FP8 weights/activations and the FP8 KV cache")
    model = from_hugging_face(src, dtype=dtype)
    try:
        cfg = dict(model.config)
        if cfg["architecture"] not in LLAMA_ARCHS:
            raise UnsupportedArchitecture(f"ModelOpt import supports {', '.join(LLAMA_ARCHS)}, not {cfg['architecture']}")
        spec_arch, source = model.spec, model.source
        assert isinstance(spec_arch, TableArch)
        rows = {f"transformer.layers.{i}.{w.trt}": w for i in range(cfg["num_hidden_layers"])
                for w in spec_arch.layer_table(cfg, i)}
        base = [(p.name, tuple(p.shape), p.dtype) for p in model.plans(0)]
        quantized: dict[str, list[str]] = {}
        excluded: list[str] = []
        for name, shape, _ in base:
            module = linear_module(name, shape)
            if module is None:
                continue
            hf = [resolve_name(source, spec_arch._candidates(h)) for h in rows[name].sources()]
            if any(h is None for h in hf):
                raise InvalidCheckpoint(f"ModelOpt export lacks the sources of {name}")
            if algo and source.info(hf[0]).dtype == torch.float8_e4m3fn:  # type: ignore[arg-type]
                quantized[module] = [h[: -len(".weight")] for h in hf]  # type: ignore[index]
            else:
                excluded.append(module)
        qc = QuantConfig(algo, kv_cache_quant_algo=kv, exclude_modules=excluded or None)
        cfg["quantization"] = qc.to_checkpoint_dict()
        cfg["kiln_quantization"] = {"imported_from": "modelopt", "producer": meta.get("producer"),
                                    "source_exclude_modules": q.get("exclude_modules")}
        spec = quantized_expected(cfg, 0, base)

        def kv_scale(layer: int) -> torch.Tensor:
            found = []
            for proj, key in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
                cands = [f"model.layers.{layer}.self_attn.{proj}.{key}", f"model.layers.{layer}.self_attn.{key}"]
                hit = resolve_name(source, cands)
                if hit is None:
                    raise InvalidCheckpoint(f"ModelOpt export declares an FP8 KV cache but lacks {cands[0]}")
                found.append(_scalar(source, hit))
            return torch.maximum(*found).float()

        def produce() -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in model.tensors(0):
                module = linear_module(name, tuple(t.shape))
                if module in quantized:
                    parts = quantized[module]
                    scales = [_scalar(source, p + ".weight_scale") for p in parts]
                    common = torch.stack(scales).max().reshape(1)
                    w = torch.cat([source.view(p + ".weight").float() * s for p, s in zip(parts, scales, strict=True)])
                    yield module + ".weight", to_fp8(w, common)
                    yield module + ".weights_scaling_factor", common
                    yield module + ".activation_scaling_factor", torch.stack(
                        [_scalar(source, p + ".input_scale") for p in parts]).max().reshape(1)
                else:
                    yield name, t
                if kv and name.endswith(".attention.qkv.weight"):
                    yield name.replace("qkv.weight", "kv_cache_scaling_factor"), kv_scale(int(name.split(".")[2]))

        write_checkpoint_dir(out, cfg, spec, produce(), producer="modelopt import")
    finally:
        model.close()
    return out

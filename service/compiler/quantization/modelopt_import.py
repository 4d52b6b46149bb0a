"""Import NVIDIA ModelOpt's HF-like export (``export_hf_checkpoint``: HF names plus ``hf_quant_config.json``,
as Megatron-LM's ModelOpt post-training example produces) into Kiln's TensorRT-LLM checkpoint.

    import_modelopt_export("./llama-fp8-modelopt", "./ckpt-fp8")

Supported, on the Llama family (Llama, Mistral, Qwen2):
* ``FP8`` (per-tensor E4M3 ``weight`` + ``weight_scale`` + ``input_scale``) and the FP8 KV cache
  (``k_proj.k_scale`` / ``v_proj.v_scale``). The export scales q, k and v separately; TensorRT-LLM's
  fused qkv has one weight scale, so the three are requantized to their common maximum (the larger
  scale never saturates) and share the largest input scale; K and V share ``kv_cache_scaling_factor``
  = max(k_scale, v_scale).
* ``W4A16_AWQ`` (int4 pairs packed [out/2, in], even row in the low nibble, ``weight_scale``
  [out, in/group], ``pre_quant_scale`` [in]). The packed weights are read through a dequantizing view
  (so the converter's plan and checks apply unchanged) and requantized group-wise; q/k/v share one
  ``prequant_scaling_factor`` in TensorRT-LLM, so theirs are averaged first (as ModelOpt's resmoothing
  does; identical scales give back the exported integers).
Linears the export left in 16 bits are written unquantized and named in ``exclude_modules``. Other
algos are refused up front.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import InvalidArgument, InvalidCheckpoint, OutputExists, UnsupportedArchitecture
from ..models.base import TORCH_DTYPES, TableArch, resolve_name
from ..sources.weights import SourceTensor, WeightSource, read_json
from .awq import awq_tensors
from .config import FP8, W4A16_AWQ, QuantConfig
from .decoder import LLAMA_ARCHS
from .fp8 import to_fp8
from .layout import linear_module, quantized_expected
from .quantize import write_checkpoint_dir
from .weight_only import dequantize_groupwise, unpack_int4_rows

SUPPORTED = (FP8, W4A16_AWQ)


class _DequantizedAWQ(WeightSource):
    """A weight source that shows ModelOpt's packed int4 AWQ weights as their float [out, in] effective
    weights (q * group scale, times pre_quant_scale per input column); everything else passes through."""

    def __init__(self, inner: WeightSource):
        self.inner = inner
        names = set(inner.names())
        self.packed = {n for n in names if n.endswith(".weight") and n[:-7] + ".pre_quant_scale" in names
                       and n[:-7] + ".weight_scale" in names and inner.info(n).dtype in (torch.int8, torch.uint8)}

    def names(self) -> list[str]:
        return self.inner.names()

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def info(self, name: str) -> SourceTensor:
        i = self.inner.info(name)
        if name in self.packed:
            return SourceTensor(name, torch.float32, (i.shape[0] * 2, i.shape[1]))
        return i

    def view(self, name: str) -> torch.Tensor:
        if name not in self.packed:
            return self.inner.view(name)
        m = name[:-7]
        q = unpack_int4_rows(self.inner.view(name).view(torch.int8))
        scale = self.inner.view(m + ".weight_scale").float()
        w = dequantize_groupwise(q, scale, None, q.shape[1] // scale.shape[1])
        return w * self.inner.view(m + ".pre_quant_scale").float()[None, :]

    def pre_quant_scale(self, module: str) -> torch.Tensor:
        return self.inner.view(module + ".pre_quant_scale").float()

    def close(self) -> None:
        self.inner.close()


def _scalar(source, name: str) -> torch.Tensor:
    return source.view(name).float().reshape(-1).max().reshape(1)


def _open_export(src: Path, dtype: str, *, dequantize_awq: bool):
    """``from_hugging_face`` over the export, with packed AWQ weights seen through ``_DequantizedAWQ``."""
    from ..checkpoint.mapping import Mapping
    from ..convert import HFCheckpointModel, from_hugging_face
    from ..models import spec_for_hf
    from ..models.hf_config import resolve_dtype
    from ..sources.weights import open_weights

    if not dequantize_awq:
        return from_hugging_face(src, dtype=dtype)
    hf = read_json(src / "config.json", "config.json")
    spec = spec_for_hf(hf)
    cfg = spec.trt_config(hf, resolve_dtype(dtype, hf), Mapping())
    spec.check_mapping(cfg, Mapping())
    source = _DequantizedAWQ(open_weights(src))
    try:
        return HFCheckpointModel(src, spec, cfg, source)
    except BaseException:
        source.close()
        raise


def import_modelopt_export(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "auto",
                           overwrite: bool = False) -> Path:
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
                              hint="supported: FP8 (+ FP8 KV cache) and W4A16_AWQ")
    model = _open_export(src, dtype, dequantize_awq=algo == W4A16_AWQ)
    try:
        cfg = dict(model.config)
        archs = tuple(a for a in LLAMA_ARCHS if a != "Qwen3ForCausalLM")  # its q/k norms are not mapped here
        if cfg["architecture"] not in archs:
            raise UnsupportedArchitecture(f"ModelOpt import supports {', '.join(archs)}, not {cfg['architecture']}")
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
            if algo == W4A16_AWQ and hf[0] in getattr(source, "packed", ()):
                quantized[module] = [h[: -len(".weight")] for h in hf]  # type: ignore[index]
            elif algo == FP8 and source.info(hf[0]).dtype == torch.float8_e4m3fn:  # type: ignore[arg-type]
                quantized[module] = [h[: -len(".weight")] for h in hf]  # type: ignore[index]
            else:
                excluded.append(module)
        qc = QuantConfig(algo, kv_cache_quant_algo=kv, exclude_modules=excluded or None,
                         group_size=int(q.get("group_size") or 128))
        mdt = TORCH_DTYPES[cfg["dtype"]]
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
                if module in quantized and algo == W4A16_AWQ:
                    assert isinstance(source, _DequantizedAWQ)
                    pqs = torch.stack([source.pre_quant_scale(p) for p in quantized[module]]).mean(0).to(mdt)
                    for k, v in awq_tensors(t.float(), pqs, None, qc.group_size, mdt, zero_point=False).items():
                        yield f"{module}.{k}", v
                elif module in quantized:
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

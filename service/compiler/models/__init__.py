"""Architecture registry, keyed by the HF ``config.json`` ``architectures`` field (for conversion) and
by the checkpoint's ``architecture`` field (for validation and loading)."""

from __future__ import annotations

from ..errors import UnsupportedArchitecture
from .base import ArchSpec
from .gemma import GEMMA_FAMILY
from .gpt import GPT2_SPEC, OPT_SPEC
from .llama import LLAMA
from .moe import MOE
from .nemotron_nas import NEMOTRON_NAS
from .phi3 import PHI3
from .qwen3 import QWEN3
from .spec import ModelSpec

_BY_HF: dict[str, ArchSpec] = {}
_BY_TRT: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for name in spec.hf_architectures:
        _BY_HF[name] = spec
    for name in spec.trt_architectures:
        _BY_TRT[name] = spec
    return spec


for _spec in (LLAMA, GPT2_SPEC, OPT_SPEC, NEMOTRON_NAS, MOE, PHI3, QWEN3, GEMMA_FAMILY):
    register(_spec)


def supported_hf_architectures() -> list[str]:
    return sorted(_BY_HF)


def spec_for_hf(hf_config: dict) -> ArchSpec:
    archs = hf_config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise UnsupportedArchitecture(
            "config.json has no 'architectures' list",
            hint=f"supported: {', '.join(supported_hf_architectures())}",
        )
    spec = _BY_HF.get(archs[0])
    if spec is None:
        raise UnsupportedArchitecture(
            f"architecture {archs[0]!r} is not supported",
            hint=f"supported: {', '.join(supported_hf_architectures())}",
        )
    return spec


def spec_for_checkpoint(config: dict) -> ArchSpec:
    arch = config.get("architecture")
    spec = _BY_TRT.get(arch) if isinstance(arch, str) else None
    if spec is None:
        raise UnsupportedArchitecture(
            f"checkpoint architecture {arch!r} is not known to Kiln",
            hint=f"known: {', '.join(sorted(_BY_TRT))}",
        )
    return spec


def block_specs(cfg: dict) -> ModelSpec:
    """The ModelSpec of a TensorRT-LLM checkpoint config, from its family module."""
    return spec_for_checkpoint(cfg).block_specs(cfg).check()


def engine_weight_map(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(engine tensor, checkpoint tensors concatenated along dim 0) of a checkpoint, from its family."""
    return spec_for_checkpoint(cfg).engine_weight_map(cfg)

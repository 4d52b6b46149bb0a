"""Reading and validating TensorRT-LLM checkpoints (ours or any other tool's).

``validate_checkpoint(dir)`` derives, from ``config.json`` alone, the complete set of tensor names,
shapes and dtypes every rank must hold, reads only the safetensors headers, and reports missing,
unexpected and mis-shaped tensors by name. ``kiln validate DIR`` prints the same report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidCheckpoint, KilnError
from ..models import spec_for_checkpoint
from ..sources.weights import read_json
from .mapping import Mapping
from .safetensors_io import SafetensorsFile, dtype_name

if TYPE_CHECKING:  # annotations only: importing the package must not import torch (kiln convert's fast path)
    import torch

REQUIRED_KEYS = ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class RankReport:
    rank: int
    file: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: expected [..] dtype, got [..] dtype"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.error)


@dataclass
class ValidationReport:
    checkpoint_dir: str
    architecture: str | None = None
    world_size: int = 0
    ranks: list[RankReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # every problem, one line each
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "checkpoint_dir": self.checkpoint_dir,
            "ok": self.ok,
            "architecture": self.architecture,
            "world_size": self.world_size,
            "errors": self.errors,
            "warnings": self.warnings,
            "ranks": [
                {"rank": r.rank, "file": r.file, "missing": r.missing, "unexpected": r.unexpected,
                 "mismatched": r.mismatched, "error": r.error}
                for r in self.ranks
            ],
        }


def load_config(ckpt_dir: Path) -> dict:
    cfg = read_json(Path(ckpt_dir) / "config.json", "checkpoint config.json")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise InvalidCheckpoint(f"config.json lacks required keys: {', '.join(missing)}")
    cfg.setdefault("mapping", {"world_size": 1, "tp_size": 1, "pp_size": 1})
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("head_size", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("intermediate_size", 4 * cfg["hidden_size"])
    return cfg


def _is_quantized(config: dict) -> bool:
    q = config.get("quantization") or {}
    return bool(q.get("quant_algo") or q.get("kv_cache_quant_algo"))


def expected_list(config: dict, rank: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every tensor of ``rank`` with shape and dtype, from config.json alone (quantized layouts too)."""
    base = spec_for_checkpoint(config).expected(config, rank)
    if _is_quantized(config):
        from ..quantization.layout import quantized_expected  # the quantizer owns its layouts

        return quantized_expected(config, rank, base)
    return base


def expected_tensors(config: dict, rank: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(shape), dt) for name, shape, dt in expected_list(config, rank)}


def validate_checkpoint(ckpt_dir: str | os.PathLike, *, strict: bool = False) -> ValidationReport:
    """Compare every rank file against the names/shapes/dtypes implied by config.json.

    Unexpected tensors are warnings (TensorRT-LLM ignores them) unless ``strict``.
    """
    ckpt_dir = Path(ckpt_dir)
    report = ValidationReport(checkpoint_dir=str(ckpt_dir))
    try:
        cfg = load_config(ckpt_dir)
        report.architecture = cfg["architecture"]
        mapping = Mapping.from_dict(cfg["mapping"])
        report.world_size = mapping.world_size
        spec_for_checkpoint(cfg)
    except KilnError as exc:
        report.errors.append(str(exc))
        return report
    present = {p.name for p in ckpt_dir.glob("rank*.safetensors")}
    wanted = {f"rank{r}.safetensors" for r in mapping.ranks()}
    for extra in sorted(present - wanted):
        report.warnings.append(f"{extra}: not part of a world of size {mapping.world_size}")
    for rank in mapping.ranks():
        fname = f"rank{rank}.safetensors"
        rr = RankReport(rank=rank, file=fname)
        report.ranks.append(rr)
        try:
            expected = {n: (tuple(s), d) for n, s, d in expected_list(cfg, rank)}
        except KilnError as exc:
            rr.error = str(exc)
            report.errors.append(f"{fname}: {exc}")
            continue
        path = ckpt_dir / fname
        if not path.exists():
            rr.error = "file is missing"
            report.errors.append(f"{fname}: file is missing")
            continue
        try:
            with SafetensorsFile(path) as f:
                infos = dict(f.infos)
        except KilnError as exc:
            rr.error = str(exc)
            report.errors.append(str(exc))
            continue
        for name, (shape, dt) in expected.items():
            info = infos.get(name)
            if info is None:
                # TensorRT-LLM accepts a missing lm_head when the embedding is there (shared table).
                if name == "lm_head.weight" and "transformer.vocab_embedding.weight" in infos:
                    report.warnings.append(f"{fname}: lm_head.weight absent; the embedding table is shared")
                    continue
                rr.missing.append(name)
            elif info.shape != shape or info.dtype != dtype_name(dt):
                rr.mismatched.append(
                    f"{name}: expected {list(shape)} {dtype_name(dt)}, got {list(info.shape)} {info.dtype}"
                )
        rr.unexpected = sorted(set(infos) - set(expected))
        report.errors += [f"{fname}: missing tensor {n}" for n in rr.missing]
        report.errors += [f"{fname}: {m}" for m in rr.mismatched]
        for n in rr.unexpected:
            (report.errors if strict else report.warnings).append(f"{fname}: unexpected tensor {n}")
    return report


class CheckpointModel:
    """A checkpoint on disk: its config, mapping, and lazily read per-rank tensors."""

    def __init__(self, ckpt_dir: Path, config: dict):
        self.ckpt_dir = ckpt_dir
        self.config = config
        self.mapping = Mapping.from_dict(config["mapping"])

    def rank_file(self, rank: int) -> Path:
        return self.ckpt_dir / f"rank{rank}.safetensors"

    def tensors(self, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
        with SafetensorsFile(self.rank_file(rank)) as f:
            for name in f.keys():
                yield name, f.tensor(name).clone()

    def validate(self, strict: bool = False) -> ValidationReport:
        return validate_checkpoint(self.ckpt_dir, strict=strict)


def from_checkpoint(ckpt_dir: str | os.PathLike) -> CheckpointModel:
    ckpt_dir = Path(ckpt_dir)
    cfg = load_config(ckpt_dir)
    spec_for_checkpoint(cfg)  # unknown architectures fail here, with the list of known ones
    return CheckpointModel(ckpt_dir, cfg)


__all__ = [
    "CheckpointModel",
    "RankReport",
    "ValidationReport",
    "expected_tensors",
    "from_checkpoint",
    "load_config",
    "validate_checkpoint",
]

"""Calibration data and the sequential (layer-by-layer) calibration pass.

Data: the bundled English text (Python's own ``pydoc_data.topics``, present on every machine) or a
user file, tokenized once and cut into non-overlapping windows: calibration windows from the front,
held-out windows (SmoothQuant's alpha search) right after them, evaluation windows (the accuracy
report) from the back, so the three never overlap. Sample count, length and source are recorded.

Sequential pass: the checkpoint tensors stream in file order (embedding, layer 0, layer 1, ..., head);
only one decoder layer's weights plus the calibration activations [N, L, H] (and, for the alpha
search, one held-out stream per alpha) are ever in memory. At each layer the float layer runs once on
the calibration activations with its linears hooked; the layer's statistics and searches are finished
before the next layer's weights are read. FP8 with GPTQ also accumulates Σ xᵀx [in, in] per input
group of the layer (dropped with the layer; 8B shape: 0.8 GiB for the down projection's).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidArgument
from .decoder import layer_index, local_name

BUNDLED = "bundled:pydoc_topics"


@dataclass
class CalibrationSettings:
    samples: int = 128
    seq_len: int = 512
    source: str = BUNDLED  # or a path to a UTF-8 text file (``--calibration-file``)
    heldout_samples: int = 4  # for the SmoothQuant alpha search
    awq_tokens: int = 512  # token sample for the AWQ scale and clip searches
    seed: int = 1234
    token_ids: torch.Tensor | None = None  # [N, L] explicit ids (models without a tokenizer); replaces source
    device: str | None = None  # None: the GPU when there is one, else the CPU

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2:
            raise InvalidArgument(f"calibration needs samples >= 1 and seq_len >= 2, got {self.samples} x {self.seq_len}")

    def record(self) -> dict:
        src = "explicit token ids" if self.token_ids is not None else self.source
        return {"source": src, "samples": self.samples, "seq_len": self.seq_len,
                "heldout_samples": self.heldout_samples, "awq_tokens": self.awq_tokens, "seed": self.seed,
                "device": self.resolved_device}

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def bundled_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(source: str) -> str:
    if source == BUNDLED:
        return bundled_text()
    path = Path(source)
    if not path.is_file():
        raise InvalidArgument(f"calibration file not found: {source}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"calibration file {source} is not UTF-8 text") from exc


def load_tokenizer(model_dir: str | os.PathLike | None):
    """The tokenizer of a model folder as data (``sources.tokenizer``: no remote code, no file outside the
    folder, typed ``InvalidTokenizer`` errors), of a GGUF file that carries one, or None when there is none."""
    if model_dir is not None and Path(model_dir).is_file():
        from ..sources.gguf import has_tokenizer, is_gguf_file

        path = Path(model_dir)
        if not (is_gguf_file(path) and has_tokenizer(path)):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    from ..sources.tokenizer import load_tokenizer as load

    return load(model_dir)


def tokenize_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


@dataclass
class CalibrationData:
    calib: torch.Tensor  # [N, L]
    heldout: torch.Tensor  # [M, L]
    record: dict = field(default_factory=dict)


def calibration_data(settings: CalibrationSettings, model_dir: str | os.PathLike | None, vocab_size: int,
                     heldout: bool = False) -> CalibrationData:
    """Calibration (and held-out) windows; errors name what is missing before any work starts."""
    m = settings.heldout_samples if heldout else 0
    if settings.token_ids is not None:
        ids = settings.token_ids.long()
        if ids.dim() != 2 or ids.shape[0] < settings.samples + m or int(ids.max()) >= vocab_size or int(ids.min()) < 0:
            raise InvalidArgument(f"calibration token ids must be [>= {settings.samples + m}, L] ids below {vocab_size}")
        windows = ids
    else:
        tok = load_tokenizer(model_dir)
        if tok is None:
            raise InvalidArgument("calibration needs a tokenizer, but the model folder has none",
                                  hint="add tokenizer files to the model folder, or pass token ids")
        windows = tokenize_windows(tok, read_text(settings.source), settings.seq_len)
        from ..sources.tokenizer import check_token_ids

        check_token_ids(windows, vocab_size, model_dir)
        if windows.shape[0] < settings.samples + m:
            raise InvalidArgument(
                f"calibration text gives {windows.shape[0]} windows of {settings.seq_len} tokens; "
                f"{settings.samples} samples (+{m} held out) were asked for",
                hint="lower --calibration-samples / --calibration-seq-len or give a longer --calibration-file")
    rec = settings.record() | {"tokens": settings.samples * windows.shape[1]}
    return CalibrationData(windows[: settings.samples], windows[settings.samples: settings.samples + m], rec)


def evaluation_windows(model_dir: str | os.PathLike, samples: int, seq_len: int, source: str = BUNDLED) -> torch.Tensor:
    """Held-out windows from the *end* of the text (never used by calibration)."""
    tok = load_tokenizer(model_dir)
    if tok is None:
        raise InvalidArgument("evaluation needs a tokenizer in the model folder")
    windows = tokenize_windows(tok, read_text(source), seq_len)
    if windows.shape[0] < samples:
        raise InvalidArgument(f"evaluation text gives only {windows.shape[0]} windows of {seq_len} tokens")
    return windows[windows.shape[0] - samples:]


# --- streaming a checkpoint layer by layer -------------------------------------------------------


def stream_layers(named: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
    """Group tensors in file order: (None, globals before the layers), (i, layer-local dict)..., (None, tail)."""
    seen_layer = False
    key: int | str = "head"
    group: dict[str, torch.Tensor] = {}
    for name, t in named:
        i = layer_index(name)
        k: int | str = i if i is not None else ("tail" if seen_layer else "head")
        seen_layer = seen_layer or i is not None
        if k != key:
            yield (None if isinstance(key, str) else key), group
            key, group = k, {}
        group[local_name(name) if i is not None else name] = t
    yield (None if isinstance(key, str) else key), group
    if key != "tail":
        yield None, {}


@dataclass
class ModuleStats:
    """Running per-input-channel statistics of one linear's input."""

    amax: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    count: int = 0
    sample: torch.Tensor | None = None
    hessian: torch.Tensor | None = None  # Σ xᵀx [in, in] over every calibration token (GPTQ), when asked for

    def update(self, x: torch.Tensor, sample_idx: torch.Tensor | None, hessian: bool = False) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        a = flat.abs()
        amax, s = a.amax(dim=0), a.sum(dim=0)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += flat.shape[0]
        if sample_idx is not None:
            self.sample = flat[sample_idx].clone()
        if hessian:
            h = flat.t() @ flat
            self.hessian = h if self.hessian is None else self.hessian.add_(h)

    @property
    def mean_abs(self) -> torch.Tensor:
        assert self.abs_sum is not None
        return self.abs_sum / max(self.count, 1)


def hooked_linear(t: dict, stats: dict[str, ModuleStats], sample_idx: torch.Tensor | None,
                  hessian: frozenset[str] = frozenset()):
    """A float linear that records its input statistics under the module name (and Σ xᵀx for the
    modules in ``hessian``)."""

    def linear(module: str, x: torch.Tensor) -> torch.Tensor:
        stats.setdefault(module, ModuleStats()).update(x, sample_idx, module in hessian)
        y = x @ t[module + ".weight"].float().t()
        b = t.get(module + ".bias")
        return y if b is None else y + b.float()

    return linear


def kv_amax_hook(box: list[float]):
    def kv(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        box[0] = max(box[0], float(k.abs().max()), float(v.abs().max()))
        return k, v

    return kv


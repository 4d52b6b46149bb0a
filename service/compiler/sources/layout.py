"""Which kind of model a path is, and opening it as (HF config dict, weight source).

- a Hugging Face folder (``config.json`` + safetensors / allowed pickle weights);
- a Meta consolidated folder (``params.json`` + ``consolidated.NN.pth``, no ``config.json``);
- a GGUF file (``*.gguf``, checked by its magic).

Meta and GGUF sources present HF names and an HF config, so every family converter reads them
unchanged; their extra outputs (the GGUF tokenizer) are written by ``OpenedModel.write_extras``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFound
from ..models.hf_config import check_hf_config
from .gguf import GGUFSource, is_gguf_file
from .meta import MetaConsolidatedSource, is_meta_folder
from .weights import WeightSource, open_weights, read_json

LAYOUTS = ("hf", "meta", "gguf")


def detect_layout(path: str | Path) -> str:
    path = Path(path)
    if path.is_file():
        if is_gguf_file(path):
            return "gguf"
        raise ModelNotFound(f"{path} is a file but not a GGUF file",
                            hint="pass a Hugging Face folder, a Meta consolidated folder or a .gguf file")
    if not path.is_dir():
        raise ModelNotFound(f"model folder not found: {path}")
    if not (path / "config.json").exists() and is_meta_folder(path):
        return "meta"
    return "hf"


@dataclass
class OpenedModel:
    layout: str
    hf_config: dict
    source: WeightSource
    write_extras: Callable[[Path], list[str]] | None = None  # writes files next to the checkpoint's config.json


def open_model(path: str | Path, *, allow_pickle: bool = False, raw: bool = False) -> OpenedModel:
    """Config and weights of any supported layout (``raw`` applies to HF safetensors only)."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "gguf":
        gguf = GGUFSource.open(path)
        try:
            return OpenedModel("gguf", check_hf_config(dict(gguf.hf)), gguf, gguf.write_tokenizer)
        except BaseException:
            gguf.close()
            raise
    if layout == "meta":
        meta = MetaConsolidatedSource.open(path)
        try:
            return OpenedModel("meta", check_hf_config(meta.hf_config()), meta)
        except BaseException:
            meta.close()
            raise
    # sizes bounded and typed before anything is sized from them (a 10^12-parameter config costs nothing)
    hf = check_hf_config(read_json(path / "config.json", "config.json"))
    return OpenedModel("hf", hf, open_weights(path, allow_pickle=allow_pickle, raw=raw))


def model_config(path: str | Path) -> dict:
    """The HF config dict of any layout (for planning, e.g. the balanced pipeline split)."""
    path = Path(path)
    if detect_layout(path) == "hf":
        return check_hf_config(read_json(path / "config.json", "config.json"))
    opened = open_model(path)
    try:
        return opened.hf_config
    finally:
        opened.source.close()


__all__ = ["LAYOUTS", "OpenedModel", "detect_layout", "model_config", "open_model"]

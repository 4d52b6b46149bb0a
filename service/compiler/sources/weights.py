"""Reading a Hugging Face model folder safely: config.json and weights, never code.

- ``config.json`` is parsed as data (size-capped); nothing from the repository is imported or run,
  whatever ``auto_map`` says.
- Weights come from safetensors (one file, or shards listed in ``model.safetensors.index.json``);
  every shard's header is validated before use and every name in the index must resolve to a file
  inside the folder.
- Pickle weights (``*.bin``, ``*.pt``, ``*.pth``) are refused unless ``allow_pickle=True``; even then
  they are read only with ``torch.load(weights_only=True, mmap=True)``.

A source describes tensor dtypes either as torch dtypes (the default) or, for ``RawSafetensorsSource``,
as safetensors codes ("BF16"): plans built over a raw source carry codes too, and are executed by
moving bytes (no torch import at all; see ``convert.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint.safetensors_io import DTYPE_NAMES, DTYPES, SafetensorsFile
from ..errors import InvalidArgument, MalformedWeights, ModelNotFound, UnsafeWeights, WeightsMismatch

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_CONFIG_BYTES = 4_000_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# checkpoint dtype names (config.json "dtype") -> safetensors codes
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _json_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """Two values for one key mean two parsers may read two different models: refused."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def read_json(path: Path, what: str, limit: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON object from a model or checkpoint folder, read as data: the file (a symlink too) must stay in its
    folder (or, in a huggingface_hub snapshot, in that repo's ``blobs/``), at most ``limit`` bytes, nested less
    deeply than the interpreter's recursion limit, standard JSON (no NaN/Infinity, no key twice, integers of at most 4300 digits)."""
    path = Path(path)
    _inside(path.parent, path.name, what)
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ModelNotFound(f"{what} not found: {path}") from exc
    if not path.is_file():
        raise InvalidArgument(f"{path.name} is not a regular file", hint="the model folder is damaged; fetch it again")
    if size > limit:
        raise InvalidArgument(f"{path.name} is {size} bytes; refusing JSON files over {limit} bytes",
                              hint="a model's JSON files are small; this one is not a real config")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text, parse_constant=_json_constant, object_pairs_hook=_no_duplicates)
    except RecursionError as exc:
        raise InvalidArgument(f"{path.name} nests too deeply to be a model's JSON file",
                              hint="a model's JSON files are shallow; this one is not a real config") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError; so are 5000-digit ints
        raise InvalidArgument(f"{path.name} is not valid JSON: {exc}"[:300],
                              hint="the file must be standard JSON (UTF-8, no NaN/Infinity, no key twice)") from exc
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path.name} must hold a JSON object", hint="the file must be one JSON object")
    return data


def _inside(folder: Path, name: str, what: str = "weight file") -> Path:
    """Resolve a file name from an index (or a well-known file name), refusing anything that escapes the folder.

    The name itself must stay inside the folder. A symlinked file may point into the folder or,
    in a huggingface_hub cache snapshot (``snapshots/<commit>/<file>`` -> ``../../blobs/<hash>``),
    into that repo's own ``blobs/`` folder, and nowhere else (not /etc/passwd, not another repo's blobs).
    """
    hint = "the model folder (or its Hugging Face snapshot) must hold its own files; re-download it"
    if not isinstance(name, str) or not name or "\x00" in name or name.startswith(("/", "\\")) or "\\" in name:
        raise UnsafeWeights(f"{what} name {name!r} is not a plain relative path", hint=hint)
    parts = Path(name).parts
    if any(p in ("..", "") for p in parts):
        raise UnsafeWeights(f"{what} name {name!r} escapes the model folder", hint=hint)
    path = folder / name
    target = path.resolve()
    allowed = [folder.resolve()]
    if folder.resolve().parent.name == "snapshots":
        allowed.append((folder.resolve().parent.parent / "blobs").resolve())
    if not any(os.path.commonpath([root, target]) == str(root) for root in allowed):
        raise UnsafeWeights(f"{what} name {name!r} resolves outside the model folder", hint=hint)
    return path


@dataclass(frozen=True)
class SourceTensor:
    name: str
    dtype: torch.dtype | str  # a safetensors code ("BF16") for raw sources
    shape: tuple[int, ...]


class WeightSource:
    """Uniform read access to a model's tensors: header info without I/O, then row views."""

    def info(self, name: str) -> SourceTensor:
        raise NotImplementedError

    def output_dtype(self, dtype: str) -> torch.dtype | str:
        """The dtype object plans over this source use for checkpoint dtype ``dtype`` ("bfloat16")."""
        return DTYPES[DTYPE_CODES[dtype]]

    def names(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def view(self, name: str) -> torch.Tensor:
        """A (possibly memory-mapped) tensor; slicing it reads only what is sliced."""
        raise NotImplementedError

    def raw(self, name: str) -> np.ndarray:
        """The tensor's elements as same-width unsigned integers, without torch (safetensors sources)."""
        raise NotImplementedError

    def release(self, name: str, row_start: int | None = None, row_end: int | None = None) -> None:
        """Tell the source that rows [row_start, row_end) (or the whole tensor) are consumed."""

    def byte_span(self, name: str, row_start: int, row_end: int) -> tuple[int, int, int] | None:
        """(fd, file offset, length) of rows [row_start, row_end) when they are stored contiguously."""
        return None

    def close(self) -> None:
        pass


class SafetensorsSource(WeightSource):
    def __init__(self, files: dict[str, SafetensorsFile], where: dict[str, str]):
        self.files = files  # file name -> opened file
        self.where = where  # tensor name -> file name

    @classmethod
    def open(cls, folder: Path) -> SafetensorsSource:
        index_path = folder / "model.safetensors.index.json"
        files: dict[str, SafetensorsFile] = {}
        where: dict[str, str] = {}
        if index_path.exists():
            index = read_json(index_path, "safetensors index", limit=100_000_000)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise MalformedWeights(f"{index_path.name}: missing or empty 'weight_map'")
            for tensor, fname in weight_map.items():
                path = _inside(folder, fname)
                if fname not in files:
                    if not path.exists():
                        raise WeightsMismatch(
                            f"shard {fname!r} named in {index_path.name} (for tensor {tensor!r}) is missing",
                            hint="download the complete model snapshot",
                        )
                    files[fname] = SafetensorsFile(path)
                if tensor not in files[fname]:
                    raise WeightsMismatch(
                        f"{index_path.name} maps tensor {tensor!r} to {fname!r}, whose header has no such tensor"
                    )
                where[tensor] = fname
        else:
            shards = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
            if not shards:
                raise ModelNotFound(f"no safetensors weights in {folder}")
            for p in shards:
                f = SafetensorsFile(_inside(folder, p.name))
                files[p.name] = f
                for tensor in f.keys():
                    if tensor in where:
                        raise MalformedWeights(f"tensor {tensor!r} appears in both {where[tensor]} and {p.name}")
                    where[tensor] = p.name
        return cls(files, where)

    def names(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str) -> SourceTensor:
        i = self.files[self.where[name]].infos[name]
        return SourceTensor(name, i.torch_dtype, i.shape)

    def view(self, name: str) -> torch.Tensor:
        return self.files[self.where[name]].tensor(name)

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy numpy view of the tensor's elements as same-width unsigned integers (no torch)."""
        return self.files[self.where[name]].raw(name)

    def release(self, name: str, row_start: int | None = None, row_end: int | None = None) -> None:
        f = self.files[self.where[name]]
        i = f.infos[name]
        if row_start is None or not i.shape:
            f.release(i.start, i.end)
            return
        row_bytes = i.nbytes // max(i.shape[0], 1)
        f.release(i.start + row_start * row_bytes, i.start + (row_end or i.shape[0]) * row_bytes)

    def byte_span(self, name: str, row_start: int, row_end: int) -> tuple[int, int, int] | None:
        f = self.files[self.where[name]]
        i = f.infos[name]
        rows = i.shape[0] if i.shape else 1
        row_bytes = i.nbytes // max(rows, 1)
        return f.fileno(), i.start + row_start * row_bytes, (row_end - row_start) * row_bytes

    def close(self) -> None:
        for f in self.files.values():
            f.close()


class RawSafetensorsSource(SafetensorsSource):
    """The same validated files, with dtypes as safetensors codes: plans over it move bytes only
    (``raw`` views, byte spans), and nothing here imports torch."""

    def info(self, name: str) -> SourceTensor:
        i = self.files[self.where[name]].infos[name]
        return SourceTensor(name, i.dtype, i.shape)

    def output_dtype(self, dtype: str) -> str:
        return DTYPE_CODES[dtype]

    def view(self, name: str) -> torch.Tensor:
        raise InvalidArgument("a raw source has no torch views (use raw())")

    def torch_source(self) -> SafetensorsSource:
        """The same opened files as an ordinary (torch) source; close one or the other, not both."""
        return SafetensorsSource(self.files, self.where)


class PickleSource(WeightSource):
    """Explicitly allowed legacy weights: torch.load(weights_only=True, mmap=True), never full pickle."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    @classmethod
    def open(cls, folder: Path) -> PickleSource:
        index_path = folder / "pytorch_model.bin.index.json"
        if index_path.exists():
            weight_map = read_json(index_path, "pickle index", limit=100_000_000).get("weight_map", {})
            files = sorted({_inside(folder, f) for f in weight_map.values()})
        else:
            files = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        import torch

        tensors: dict[str, torch.Tensor] = {}
        for path in files:
            if not path.exists():
                raise WeightsMismatch(f"weight file {path.name} named in the index is missing")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # weights_only refuses anything but tensors and containers
                raise UnsafeWeights(f"{path.name}: refused by the weights-only loader ({exc})") from exc
            if not isinstance(state, dict):
                raise UnsafeWeights(f"{path.name}: does not hold a state dict")
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    tensors[k] = v
        return cls(tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> SourceTensor:
        t = self.tensors[name]
        return SourceTensor(name, t.dtype, tuple(t.shape))

    def view(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class MetaSource(WeightSource):
    """Shapes only (e.g. from a model built on the meta device): plans, never data."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.shapes = shapes

    def names(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def info(self, name: str) -> SourceTensor:
        shape, dtype = self.shapes[name]
        return SourceTensor(name, dtype, tuple(shape))

    def view(self, name: str) -> torch.Tensor:
        raise InvalidArgument("a meta source has no data")


def open_weights(folder: Path, allow_pickle: bool = False, *, raw: bool = False) -> WeightSource:
    """The model's weights; ``raw``: safetensors as a ``RawSafetensorsSource`` (pickle weights are
    always an ordinary torch source)."""
    folder = Path(folder)
    has_safetensors = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists()
    if has_safetensors:
        return (RawSafetensorsSource if raw else SafetensorsSource).open(folder)
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        if not allow_pickle:
            raise UnsafeWeights(
                f"{folder.name} only has pickle weights ({', '.join(sorted(pickles)[:3])}); pickle can run code",
                hint="use a safetensors revision of the model, or pass --allow-pickle to load them "
                "with torch.load(weights_only=True)",
            )
        return PickleSource.open(folder)
    raise ModelNotFound(f"no weights (*.safetensors) found in {folder}")


__all__ = [
    "DTYPE_NAMES",
    "MetaSource",
    "PickleSource",
    "RawSafetensorsSource",
    "SafetensorsSource",
    "SourceTensor",
    "WeightSource",
    "open_weights",
    "read_json",
]

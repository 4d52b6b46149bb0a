"""Validated, memory-mapped safetensors reading and streaming, offset-addressed writing.

Reading: the header is checked before any tensor byte is touched (size cap, JSON shape, known
dtypes, byte lengths matching shapes, offsets inside the file, no overlaps or gaps, buffer fully
covered), then tensors are exposed as zero-copy views of a private memory map. After a caller has
consumed a region it calls ``release`` so the pages leave this process's resident set: peak RSS
stays bounded by what is being processed, not by the model size.

Writing: ``SafetensorsWriter`` is given every (name, dtype, shape) up front, writes the header,
sizes the file, and then accepts chunks at any tensor offset from any thread (``os.pwrite``), so
output tensors can be produced one at a time, in row chunks, by several workers.

torch is imported lazily (only for torch views and torch chunks): header validation, the raw
(numpy / byte-range) accessors and the writer work without it, which is what lets ``kiln convert``
copy bytes without paying for ``import torch``.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from collections.abc import Mapping as _Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MalformedWeights

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  # the safetensors reference implementation's cap
PAGE = mmap.PAGESIZE

class LazyMap(_Mapping):
    """A read-only mapping built on first use (lets torch-keyed tables exist without importing torch)."""

    def __init__(self, build: Callable[[], dict]):
        self._build = build
        self._data: dict | None = None

    def _get(self) -> dict:
        if self._data is None:
            self._data = self._build()
        return self._data

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self) -> Iterator:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


def _torch_dtypes() -> dict:
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }


# safetensors dtype code -> bytes per element (the codes this reader accepts)
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
DTYPES: _Mapping[str, torch.dtype] = LazyMap(_torch_dtypes)
DTYPE_NAMES: _Mapping[torch.dtype, str] = LazyMap(lambda: {v: k for k, v in DTYPES.items()})
# an unsigned integer of the same width: raw element moves (slices, transposes) never interpret values
RAW_NP: dict[int, np.dtype] = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32),
                               8: np.dtype(np.uint64)}


def itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or of a safetensors dtype code."""
    if isinstance(dtype, str):
        return ITEMSIZE[dtype]
    return dtype.itemsize


def dtype_name(dtype: torch.dtype | str) -> str:
    """The safetensors code of a torch dtype (a code is returned as is)."""
    if isinstance(dtype, str):
        if dtype in ITEMSIZE:
            return dtype
        raise KeyError(dtype)
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Raises MalformedWeights naming file and tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MalformedWeights(f"{path.name}: file is {size} bytes, too small for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise MalformedWeights(
                    f"{path.name}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap",
                    hint="the file is corrupt or not a safetensors file",
                )
            if n + 8 > size:
                raise MalformedWeights(
                    f"{path.name}: header length {n} runs past the end of the {size}-byte file (truncated?)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise MalformedWeights(f"{path.name}: cannot read ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedWeights(f"{path.name}: header is not valid UTF-8") from exc
    if not text.startswith("{"):
        raise MalformedWeights(f"{path.name}: header does not start with '{{'")
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        seen: dict = {}
        for k, v in pairs:
            if k in seen:
                raise MalformedWeights(f"{path.name}: header names {k!r} twice")
            seen[k] = v
        return seen

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise MalformedWeights(f"{path.name}: header is not valid JSON ({exc.msg})") from exc
    if not isinstance(header, dict):
        raise MalformedWeights(f"{path.name}: header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MalformedWeights(f"{path.name}: __metadata__ must map strings to strings")

    base = 8 + n
    buffer_len = size - base
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path.name}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise MalformedWeights(f"{where}: entry is not an object")
        dt = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dt not in ITEMSIZE:
            raise MalformedWeights(f"{where}: unsupported dtype {dt!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise MalformedWeights(f"{where}: invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise MalformedWeights(f"{where}: invalid data_offsets {offsets!r}")
        nbytes = _numel(tuple(shape)) * ITEMSIZE[dt]
        if offsets[1] - offsets[0] != nbytes:
            raise MalformedWeights(
                f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes but shape {shape} of {dt} needs {nbytes}"
            )
        if offsets[1] > buffer_len:
            raise MalformedWeights(
                f"{where}: data_offsets {offsets} run past the end of the data buffer ({buffer_len} bytes; truncated file?)"
            )
        infos[name] = TensorInfo(name, dt, tuple(shape), base + offsets[0], base + offsets[1])

    # Offsets must tile the buffer exactly: no overlaps, no gaps, no trailing bytes.
    pos = base
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start < pos:
            raise MalformedWeights(f"{path.name}: tensor {info.name!r} overlaps the previous tensor's bytes")
        if info.start > pos:
            raise MalformedWeights(f"{path.name}: gap of {info.start - pos} bytes before tensor {info.name!r}")
        pos = info.end
    if pos != size:
        raise MalformedWeights(
            f"{path.name}: {size - pos} bytes after the last tensor are not described by the header"
        )
    return infos, metadata


class SafetensorsFile:
    """A validated safetensors file; tensors are zero-copy views of a private memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.infos, self.metadata = read_header(self.path)
        self._mm: mmap.mmap | None = None
        self._fd = -1
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def _map(self) -> mmap.mmap:
        with self._lock:
            if self._mm is None:
                with open(self.path, "rb") as f:
                    # ACCESS_COPY: writable private mapping (torch wants writable buffers); never written.
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._mm

    def fileno(self) -> int:
        """A read-only descriptor of the file (for kernel-side copies of byte ranges)."""
        with self._lock:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy view of a whole tensor (do not modify it)."""
        import torch

        info = self.infos[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        mm = self._map()
        flat = torch.frombuffer(mm, dtype=info.torch_dtype, count=_numel(info.shape), offset=info.start)
        return flat.view(info.shape)

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy numpy view of a whole tensor's elements as unsigned integers of the same width
        (no torch; values are never interpreted, only moved). Do not modify it."""
        info = self.infos[name]
        raw_dt = RAW_NP[ITEMSIZE[info.dtype]]
        if info.nbytes == 0:
            return np.empty(info.shape, dtype=raw_dt)
        mm = self._map()
        return np.frombuffer(mm, dtype=raw_dt, count=_numel(info.shape), offset=info.start).reshape(info.shape)

    def release(self, start: int, end: int) -> None:
        """Drop mapped pages of [start, end) from this process (the page cache keeps them)."""
        if self._mm is None or end <= start:
            return
        a = (start // PAGE) * PAGE
        b = min(((end + PAGE - 1) // PAGE) * PAGE, len(self._mm))
        if b > a:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)
            except (AttributeError, OSError, ValueError):
                pass

    def release_tensor(self, name: str) -> None:
        info = self.infos[name]
        self.release(info.start, info.end)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._mm is not None:
                try:
                    self._mm.close()
                except BufferError:
                    pass  # a view is still alive; the map is freed with it
                self._mm = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsWriter:
    """Writes a safetensors file whose layout is fixed up front; chunks land at computed offsets."""

    def __init__(
        self,
        path: str | os.PathLike,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        self.offsets: dict[str, tuple[int, int]] = {}
        self.entries = {name: (dt, tuple(shape)) for name, dt, shape in entries}
        pos = 0
        for name, dt, shape in entries:
            nbytes = _numel(tuple(shape)) * ITEMSIZE[dt]
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self.offsets[name] = (pos, pos + nbytes)
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((8 - len(raw) % 8) % 8)  # align the data buffer to 8 bytes
        self.base = 8 + len(raw)
        self.total_bytes = self.base + pos
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        try:  # reserve the blocks up front: contiguous extents however the chunks arrive, and a
            # full disk fails here, before any tensor is produced
            os.posix_fallocate(self._fd, 0, self.total_bytes)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                os.close(self._fd)
                raise OSError(errno.ENOSPC, f"not enough space for {self.path.name} ({self.total_bytes} bytes)") from exc
            os.ftruncate(self._fd, self.total_bytes)  # filesystems without fallocate

    def write(self, name: str, byte_offset: int, chunk: torch.Tensor | np.ndarray) -> int:
        """Write ``chunk`` (already in the tensor's dtype; a torch tensor, or a numpy array holding the
        raw elements) at ``byte_offset`` inside tensor ``name``."""
        start, end = self.offsets[name]
        if isinstance(chunk, np.ndarray):
            data = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
        else:
            import torch

            data = chunk.contiguous().view(-1).view(torch.uint8).numpy()
        if start + byte_offset + data.nbytes > end:
            raise ValueError(f"chunk overruns tensor {name!r}")
        view = data.data  # the array's own buffer (numpy's stubs declare __buffer__ for Python >= 3.12 only)
        pos = self.base + start + byte_offset
        while view.nbytes:
            n = os.pwrite(self._fd, view, pos)
            view = view[n:]
            pos += n
        return data.nbytes

    def copy_from(self, name: str, byte_offset: int, src_fd: int, src_offset: int, nbytes: int) -> int:
        """Kernel-side copy (copy_file_range) of ``nbytes`` from ``src_fd`` into tensor ``name``."""
        start, end = self.offsets[name]
        if start + byte_offset + nbytes > end:
            raise ValueError(f"copy overruns tensor {name!r}")
        dst = self.base + start + byte_offset
        done = 0
        while done < nbytes:
            n = os.copy_file_range(src_fd, self._fd, nbytes - done, src_offset + done, dst + done)
            if n == 0:
                raise OSError("copy_file_range made no progress (source shorter than its header says?)")
            done += n
        return done

    def close(self, fsync: bool = True) -> None:
        if self._fd >= 0:
            if fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(fsync=exc[0] is None)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place: fsync it, rename it to ``out`` (an existing
    ``out`` is swapped aside only now, then removed), fsync the parent. Readers see the old or the
    new directory, never a partial one."""
    fsync_dir(tmp)
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)

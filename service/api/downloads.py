"""HTTP Range parsing and a streamed (never buffered) tar writer for artifact downloads."""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from service.domain.errors import RangeNotSatisfiable

BLOCK = 512


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range -> (start, end) inclusive; None for no/ignored header."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None  # multiple ranges: answer with the whole file (allowed by RFC 9110)
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise RangeNotSatisfiable(f"invalid suffix range {header!r}")
            start, end = max(0, size - n), size - 1
        else:
            start = int(first)
            end = int(last) if last else size - 1
    except ValueError as exc:
        raise RangeNotSatisfiable(f"malformed Range header {header!r}") from exc
    if start >= size or start > end or start < 0:
        raise RangeNotSatisfiable(f"range {header!r} is outside the file of {size} bytes")
    return start, min(end, size - 1)


def stream_tar(entries: list[tuple[str, Path]], chunk: int = 1 << 20) -> Iterator[bytes]:
    """A ustar/pax archive of ``entries`` (archive name, file) produced chunk by chunk."""
    now = int(time.time())
    for name, path in entries:
        size = path.stat().st_size
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, now, 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with open(path, "rb") as f:
            while data := f.read(chunk):
                yield data
        if size % BLOCK:
            yield b"\0" * (BLOCK - size % BLOCK)
    yield b"\0" * (BLOCK * 2)

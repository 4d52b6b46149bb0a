"""HTTP Range parsing and a streamed (never buffered) tar writer for artifact downloads."""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from service.domain.errors import RangeNotSatisfiable

BLOCK = 512


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range -> (start, end) inclusive; None for no header. Anything else is a 416 (the caller adds
    ``Content-Range: bytes */size``): another unit, several ranges (no multipart/byteranges here: a resuming
    client asks for one), a malformed or an unsatisfiable range. Never the whole file for a Range it cannot serve.
    An empty header is no header."""
    if not header:
        return None
    unit, eq, spec = header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        raise RangeNotSatisfiable(f"range unit of {header!r} is not supported: only bytes",
                                  hint="send Range: bytes=<start>-<end> (one range), or no Range for the whole file")
    if "," in spec:
        raise RangeNotSatisfiable(f"{header!r} asks for several ranges: one range per request is served",
                                  hint="ask for each range in its own request (Range: bytes=<start>-<end>)")
    first, dash, last = spec.strip().partition("-")
    try:
        if not dash:
            raise ValueError(spec)
        if first == "":
            n = _digits(last)
            if n <= 0:
                raise RangeNotSatisfiable(f"invalid suffix range {header!r}")
            start, end = max(0, size - n), size - 1
        else:
            start = _digits(first)
            end = _digits(last) if last.strip() else size - 1
    except ValueError as exc:
        raise RangeNotSatisfiable(f"malformed Range header {header!r}",
                                  hint="send Range: bytes=<start>-<end>, bytes=<start>- or bytes=-<suffix length>") from exc
    if start >= size or start > end:
        raise RangeNotSatisfiable(f"range {header!r} is outside the file of {size} bytes")
    return start, min(end, size - 1)


def _digits(text: str) -> int:
    text = text.strip()
    if not text.isascii() or not text.isdigit():  # int() would take "+5", "1_000" and non-ASCII digits
        raise ValueError(text)
    return int(text)


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

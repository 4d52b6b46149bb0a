"""ArtifactStore: content-addressed stage outputs under ``$KILN_STORAGE/stages/<stage>/<key>/``.

A stage writes into ``stages/<stage>/.tmp-<job>-<token>-<random>/`` (named by the lease it runs under, so
an orphan is recognised by its dead lease: ``reclaim_temps``); ``commit`` hashes every file into
``manifest.json`` (sha256 + size), fsyncs files and manifest, renames the directory into place and
fsyncs the parent. A directory under its final key is therefore always complete; the manifest is
the commit marker and the only map from a public path to a file on disk (no traversal possible).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from service.domain.ports import UnsafePath

MANIFEST = "manifest.json"
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_relpath(path: str) -> str:
    """A relative POSIX path with no '..', no absolute part, no backslashes or NULs."""
    if not path or "\x00" in path or "\\" in path:
        raise UnsafePath(f"invalid artifact path {path!r}")
    p = PurePosixPath(path)
    if path.startswith("/") or any(part in ("..", ".", "") for part in path.split("/")):
        raise UnsafePath(f"artifact path {path!r} escapes the artifact")
    return str(p)


def build_manifest(directory: Path) -> dict:
    files = []
    for p in sorted(directory.rglob("*")):
        if p.is_symlink():
            raise UnsafePath(f"stage output contains a symlink: {p.relative_to(directory)}")
        if p.is_file() and p.name != MANIFEST:
            files.append({"path": p.relative_to(directory).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)})
    return {"files": files, "bytes": sum(f["size"] for f in files)}


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def stage_root(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def path(self, stage: str, key: str) -> Path:
        if not key.isalnum() or not stage.replace("_", "").isalnum():
            raise UnsafePath(f"invalid stage/key {stage!r}/{key!r}")
        return self.stage_root(stage) / key

    def has(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / MANIFEST).is_file()

    def new_tmp(self, stage: str, owner: tuple[str, int] | None = None) -> Path:
        """A fresh, not yet existing temp path on the same filesystem as the final location.

        ``owner`` = (job id, fencing token) of the lease the writer holds, written into the name
        (``.tmp-<job hex>-<token>-<random>``) so that ``reclaim_temps`` can tell a live writer's
        directory from a dead one's; the compiler's own temp siblings (``..tmp-<…>.tmp-<x>``) carry it too."""
        root = self.stage_root(stage)
        root.mkdir(parents=True, exist_ok=True)
        if owner is None:
            return root / f".tmp-{uuid.uuid4().hex}"
        job_id, token = owner
        return root / f".tmp-{job_hex(job_id)}-{int(token)}-{uuid.uuid4().hex[:12]}"

    def commit(self, stage: str, key: str, tmp: Path, extra: dict | None = None) -> dict:
        """Manifest + fsync + rename ``tmp`` to its key. If another writer won the race, keep theirs."""
        final = self.path(stage, key)
        tmp.mkdir(parents=True, exist_ok=True)
        manifest = build_manifest(tmp)
        manifest.update(extra or {})
        manifest["stage"], manifest["key"], manifest["created_at"] = stage, key, time.time()
        for f in manifest["files"]:
            with open(tmp / f["path"], "rb") as fh:
                os.fsync(fh.fileno())
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not self.has(stage, key):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # identical content already published
            return self.manifest(stage, key)
        _fsync_dir(final.parent)
        return manifest

    def discard(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def manifest(self, stage: str, key: str) -> dict:
        return json.loads((self.path(stage, key) / MANIFEST).read_text())

    def open_path(self, stage: str, key: str, relpath: str) -> tuple[Path, dict]:
        """The file behind a public path, only if the manifest lists it and it stays inside the key dir."""
        rel = safe_relpath(relpath)
        entry = next((f for f in self.manifest(stage, key)["files"] if f["path"] == rel), None)
        if entry is None:
            raise FileNotFoundError(rel)
        base = self.path(stage, key).resolve()
        target = (base / rel)
        if target.is_symlink() or os.path.commonpath([base, target.resolve()]) != str(base):
            raise UnsafePath(f"artifact path {relpath!r} escapes the artifact")
        return target, entry

    def iter_file(self, path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes [start, end] inclusive."""
        remaining = (end - start + 1) if end is not None else None
        with open(path, "rb") as f:
            f.seek(start)
            while remaining is None or remaining > 0:
                chunk = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def temp_entries(self) -> list[Path]:
        """Every temporary entry under ``stages/<stage>/``: ours (``.tmp-*``), the compiler's temp siblings
        (``..tmp-*.tmp-*``) and any other dot entry a stage left there. Finished keys never start with a dot."""
        stages = self.root / "stages"
        if not stages.is_dir():
            return []
        return sorted(p for p in stages.glob("*/.*") if p.name not in (".", ".."))

    def reclaim_temps(self, live_leases: Callable[[], Collection[tuple[str, int]]], *,
                      unowned_older_than_s: float | None = None, job_id: str | None = None,
                      dry_run: bool = False) -> Reclaimed:
        """Remove orphaned temporary outputs; never one that belongs to a live lease.

        A temp entry named by its owner (``new_tmp(owner=…)``) is removed when its (job, fencing token)
        is not in ``live_leases()``: the job finished, failed, or its lease expired or passed to a newer
        token (a fenced writer can publish nothing anyway). ``live_leases`` is called after the
        directories are listed, so a lease granted meanwhile cannot lose a directory it just created
        (that directory is not in the listing). Entries without an owner in their name (older releases,
        other tools) go only once nothing in them changed for ``unowned_older_than_s`` (None: kept).
        ``job_id``: only that job's entries. Returns what was (or, dry run, would be) freed."""
        entries = self.temp_entries()
        live = {(job_hex(j), int(t)) for j, t in live_leases()}
        want = job_hex(job_id) if job_id is not None else None
        now = time.time()
        out = Reclaimed()
        for entry in entries:
            m = _OWNER_RE.search(entry.name)
            if m is not None:
                owner = (m.group(1), int(m.group(2)))
                if (want is not None and owner[0] != want) or owner in live:
                    out.kept += 1
                    continue
            elif want is not None or unowned_older_than_s is None or \
                    now - _newest_mtime(entry) < unowned_older_than_s:
                out.kept += 1
                continue
            size = _tree_bytes(entry)
            if not dry_run:
                try:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                except FileNotFoundError:
                    continue  # its writer removed it meanwhile
                except OSError:
                    out.failed.append(str(entry))
                    continue
            out.removed.append(str(entry))
            out.bytes += size
        return out

    def sweep(self, older_than_s: float) -> int:
        """Remove unowned temp entries unchanged for ``older_than_s`` (owned ones need the leases:
        ``reclaim_temps``). For callers without a job store."""
        now = time.time()
        removed = 0
        for entry in self.temp_entries():
            if _OWNER_RE.search(entry.name) is None and now - _newest_mtime(entry) >= older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed


_OWNER_RE = re.compile(r"\.tmp-([0-9a-f]{32})-(\d+)-[0-9a-f]+")


def job_hex(job_id: str) -> str:
    return job_id.replace("-", "").lower()


@dataclass
class Reclaimed:
    removed: list[str] = field(default_factory=list)
    bytes: int = 0
    kept: int = 0  # temp entries of live leases (or too young to judge)
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{len(self.removed)} orphaned temp dirs, {self.bytes} bytes freed; {self.kept} kept (live leases)"


def _tree_bytes(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        try:
            return path.lstat().st_size
        except FileNotFoundError:
            return 0
    total = 0
    for base, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _newest_mtime(path: Path) -> float:
    """The latest change anywhere in the tree (a directory's own mtime misses writes into its files)."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return time.time()
    if path.is_dir() and not path.is_symlink():
        for base, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(base, name)).st_mtime)
                except FileNotFoundError:
                    pass
    return newest

"""ArtifactStore: content-addressed stage outputs under ``$KILN_STORAGE/stages/<stage>/<key>/``.

A stage writes into ``stages/<stage>/.tmp-<uuid>/``; ``commit`` hashes every file into
``manifest.json`` (sha256 + size), fsyncs files and manifest, renames the directory into place and
fsyncs the parent. A directory under its final key is therefore always complete; the manifest is
the commit marker and the only map from a public path to a file on disk (no traversal possible).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
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

    def new_tmp(self, stage: str) -> Path:
        """A fresh, not yet existing temp path on the same filesystem as the final location."""
        root = self.stage_root(stage)
        root.mkdir(parents=True, exist_ok=True)
        return root / f".tmp-{uuid.uuid4().hex}"

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

    def sweep(self, older_than_s: float) -> int:
        """Remove abandoned temp directories (a crashed writer's) older than ``older_than_s``."""
        removed = 0
        stages = self.root / "stages"
        if not stages.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        for tmp in stages.glob("*/.*"):  # ours (.tmp-*) and the compiler's temp siblings
            try:
                if tmp.stat().st_mtime < cutoff:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

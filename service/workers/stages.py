"""The stages Kiln runs today (fetch, convert), registered into the pipeline, and submit-time checks.

Each stage is a thin call into ``service.compiler``; later stages (quantize, build, evaluate) register
the same way from their own modules or through ``KILN_STAGE_PLUGINS``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from service.domain.spec import JobSpec
from service.settings import Settings

from .job_mapping import job_mapping
from .pipeline import Progress, Stage, StageContext, register_stage, validate_spec


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def model_not_found_hint(settings: Settings, spec: JobSpec, *, downloading: bool) -> str:
    """What an operator does about a repo id the service cannot resolve: the service takes repo ids only,
    through its own cache, so the hint names that cache and, online, the token reference."""
    rev = f" --revision {spec.revision}" if spec.revision else ""
    seed = (f"put it into the service's Hugging Face cache ({settings.hf_cache}) from a machine that reaches the hub: "
            f"`huggingface-cli download {spec.model}{rev} --cache-dir {settings.hf_cache}` (then copy that folder "
            "here)")
    if not downloading:
        return seed + ("; or let workers download it: unset HF_HUB_OFFLINE" if _hf_offline() else "")
    token = ("the workers read the token from the environment variable KILN_HF_TOKEN_ENV names"
             if not (settings.hf_token_env or settings.hf_token_file) else "check the token the workers' "
             + ("KILN_HF_TOKEN_ENV" if settings.hf_token_env else "KILN_HF_TOKEN_FILE") + " reference points to")
    return (f"check the repo id and revision; a private or gated repo needs a Hugging Face token with access "
            f"({token}); or {seed}")


def resolve_in_cache(settings: Settings, spec: JobSpec, *, allow_download: bool, token: str | None = None) -> Path:
    """The repo's snapshot folder inside ``$KILN_STORAGE/hf-cache`` (never a server path)."""
    from service.compiler.errors import ModelNotFound
    from service.compiler.sources.hub import resolve_model_dir

    if spec.is_local_source or spec.model is None:
        raise ModelNotFound(f"job source {spec.source!r} is not a Hugging Face repo")
    cache = settings.hf_cache
    cache.mkdir(parents=True, exist_ok=True)
    try:
        folder = resolve_model_dir(spec.model, revision=spec.revision, cache_dir=cache, token=token,
                                   allow_download=allow_download, repo_only=True)
    except ModelNotFound as exc:  # the compiler's hint speaks of local folders, which the service refuses
        raise ModelNotFound(exc.message, hint=model_not_found_hint(settings, spec, downloading=allow_download)) from exc
    if os.path.commonpath([cache.resolve(), Path(folder).absolute()]) != str(cache.resolve()):
        # belt and braces: a repo id must never name a folder on the server
        raise ModelNotFound(f"{spec.model!r} is not a Hugging Face repo in the cache")
    return Path(folder)


def resolve_local_source(settings: Settings, spec: JobSpec) -> Path:
    """The Meta folder / GGUF file a ``source: {kind: meta | gguf, path}`` names, inside the sources root.

    The path was checked as plain relative names by the JobSpec; here it is resolved (symlinks
    followed) and must still lie inside ``settings.sources_root`` and be what its kind says."""
    from service.compiler.errors import ModelNotFound, UnsafeWeights
    from service.compiler.sources.layout import detect_layout

    assert spec.source is not None and spec.source.path is not None
    root = settings.sources_root
    hint = f"put the model under the service's sources root ({root}, KILN_SOURCES_DIR) and name it relative to it"
    candidate = root / spec.source.path
    try:
        resolved = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ModelNotFound(f"{spec.source.kind} source {spec.source.path!r} does not exist under the sources root",
                            hint=hint) from exc
    if os.path.commonpath([root, resolved]) != str(root):
        raise UnsafeWeights(f"{spec.source.kind} source {spec.source.path!r} resolves outside the sources root",
                            hint=hint)
    layout = detect_layout(resolved)
    if layout != spec.source.kind:
        raise ModelNotFound(f"{spec.source.path!r} is not a {spec.source.kind} model (it looks like: {layout})",
                            hint="a meta source is a folder with params.json and consolidated.NN.pth; a gguf source "
                            "is one .gguf file")
    return resolved


def _local_files(path: Path) -> list[tuple[str, Path]]:
    if path.is_file():
        return [(path.name, path)]
    return sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())


def _fetch_local(ctx: StageContext, output_dir: Path, progress: Progress) -> dict:
    """A local source is not copied: its files are hashed (content address of the stages after it)."""
    assert ctx.spec.source is not None
    path = resolve_local_source(ctx.settings, ctx.spec)
    files = _local_files(path)
    total = sum(p.stat().st_size for _, p in files) or 1
    done = 0
    digest = hashlib.sha256()
    listing = []
    for rel, p in files:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
                done += len(block)
                progress(done / total, f"hashing {rel}")
        listing.append({"path": rel, "size": p.stat().st_size, "sha256": h.hexdigest()})
        digest.update(f"{rel}\0{h.hexdigest()}\n".encode())
    output_dir.mkdir(parents=True, exist_ok=True)
    source = {"kind": ctx.spec.source.kind, "path": ctx.spec.source.path, "files": listing}
    (output_dir / "source.json").write_text(json.dumps(source, indent=1))
    progress(1.0, f"{len(files)} files, sha256 {digest.hexdigest()[:12]}")
    return {"kind": ctx.spec.source.kind, "files": len(files), "bytes": sum(f["size"] for f in listing),
            "output_dir": str(path), "content_key": digest.hexdigest()}


def fetch_stage(ctx: StageContext, input_dir: Path | None, output_dir: Path, cfg: dict, progress: Progress) -> dict:
    if ctx.spec.is_local_source:
        return _fetch_local(ctx, output_dir, progress)
    assert ctx.spec.model is not None
    progress(0.0, f"resolving {ctx.spec.model}")
    model_dir = resolve_in_cache(ctx.settings, ctx.spec, allow_download=not _hf_offline(), token=ctx.hf_token())
    files = sorted((p.relative_to(model_dir).as_posix(), p.stat().st_size) for p in model_dir.rglob("*") if p.is_file())
    commit = model_dir.name  # snapshot folders are named by the resolved commit sha
    output_dir.mkdir(parents=True, exist_ok=True)
    source = {"model": ctx.spec.model, "revision": ctx.spec.revision, "commit": commit,
              "files": [{"path": p, "size": s} for p, s in files]}
    (output_dir / "source.json").write_text(json.dumps(source, indent=1))
    progress(1.0, f"{len(files)} files at commit {commit[:12]}")
    return {
        "commit": commit, "files": len(files), "bytes": sum(s for _, s in files),
        "output_dir": str(model_dir),
        "content_key": hashlib.sha256(json.dumps([commit, files]).encode()).hexdigest(),
    }


def convert_stage(ctx: StageContext, input_dir: Path | None, output_dir: Path, cfg: dict, progress: Progress) -> dict:
    from service.compiler import convert_checkpoint

    assert input_dir is not None
    mapping = job_mapping(cfg["tp_size"], cfg["pp_size"], cfg.get("pp_split", "even"), input_dir,
                          cfg.get("moe_ep_size"))
    summary = convert_checkpoint(input_dir, output_dir, dtype=cfg["dtype"], mapping=mapping, progress=progress)
    result = summary.to_dict()
    result.pop("out_dir", None)
    return result


def fetch_config(spec: JobSpec) -> dict:
    if spec.is_local_source:
        assert spec.source is not None
        return {"source": spec.source.kind, "path": spec.source.path}
    return {"model": spec.model, "revision": spec.revision}


register_stage(Stage("fetch", fetch_stage, config=fetch_config, keyed_by_output=True, weight=0.1))
register_stage(Stage("convert", convert_stage, artifact="checkpoint", weight=1.0,
                     config=lambda s: {"dtype": s.dtype, "tp_size": s.mapping.tp_size, "pp_size": s.mapping.pp_size,
                                       **({"pp_split": "balanced"} if s.mapping.pp_split == "balanced" else {}),
                                       **({"moe_ep_size": s.mapping.moe_ep_size} if s.mapping.moe_ep_size else {})}))


def make_submit_validator(settings: Settings):
    """Checks at submit time, writing nothing: stages exist for the spec; with the model already in
    the cache, the compiler's preflight (architecture, shapes, tp/pp split); offline, the model must be cached."""
    from service.compiler import preflight
    from service.compiler.errors import ModelNotFound

    def validate(spec: JobSpec) -> None:
        validate_spec(spec)
        if spec.webhook_url:
            from .webhooks import check_webhook_url

            check_webhook_url(spec.webhook_url, allow_private=settings.webhook_allow_private)
        if spec.is_local_source:
            model_dir: Path | None = resolve_local_source(settings, spec)
        else:
            try:
                model_dir = resolve_in_cache(settings, spec, allow_download=False)
            except ModelNotFound:
                if _hf_offline():
                    raise
                model_dir = None  # online: the fetch stage downloads it
        if model_dir is not None:
            preflight(model_dir, dtype=spec.dtype,
                      mapping=job_mapping(spec.mapping.tp_size, spec.mapping.pp_size, spec.mapping.pp_split, model_dir,
                                          spec.mapping.moe_ep_size))
        if spec.quantization.requested or spec.build is not None:
            from .compile_stages import validate_compile

            validate_compile(settings, spec, model_dir)

    return validate

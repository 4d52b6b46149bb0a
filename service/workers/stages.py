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


def fetch_stage(ctx: StageContext, input_dir: Path | None, output_dir: Path, cfg: dict, progress: Progress) -> dict:
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


register_stage(Stage("fetch", fetch_stage, config=lambda s: {"model": s.model, "revision": s.revision},
                     keyed_by_output=True, weight=0.1))
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

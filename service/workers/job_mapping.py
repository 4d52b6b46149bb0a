"""The compiler Mapping of a job, shared by the convert stage and the submit-time checks of
``stages.py`` and ``compile_stages.py`` (here so that neither of those imports the other back)."""

from __future__ import annotations

from pathlib import Path


def job_mapping(tp_size: int, pp_size: int, pp_split: str, model_dir: Path | None, moe_ep_size: int | None = None):
    """The compiler Mapping of a job: TensorRT-LLM's even split, or the cost-balanced one (priced
    from the model's config.json); ``moe_ep_size``: the experts' split of a Mixture-of-Experts model."""
    from dataclasses import replace

    from service.compiler import Mapping

    if pp_split == "balanced" and pp_size > 1 and model_dir is not None:
        from service.compiler.checkpoint.pipeline_split import balanced_mapping
        from service.compiler.sources.layout import model_config

        m = balanced_mapping(model_config(model_dir), tp=tp_size, pp=pp_size)
        return replace(m, moe_ep_size=moe_ep_size) if moe_ep_size else m
    return Mapping(tp_size=tp_size, pp_size=pp_size, moe_ep_size=moe_ep_size)

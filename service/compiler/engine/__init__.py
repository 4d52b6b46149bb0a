"""Kiln's torch engine, the product: ``Engine.load/generate`` (``engine.py``) over the one engine model
(``model.py``), quantized linears (``engine_quant.py``), Triton kernels by op (``kernels/``), tp rank
processes (``ranks.py``) and the build's performance measurement (``performance.py``).

    from service.compiler.engine import Engine, SamplingConfig
    engine = Engine.load("./engine"); engine.generate([[1, 2, 3]], 16)

Importing this package imports no torch; ``Engine`` and friends load ``engine.py`` on first use.
"""

from __future__ import annotations

__all__ = ["Engine", "GenerationOutput", "SamplingConfig"]


def __getattr__(name: str):
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

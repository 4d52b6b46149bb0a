"""Triton kernels of the engine on CUDA, by op (imported only where Triton and a GPU exist; the CPU
engine does not use them):

* ``attention``: ``decode_attention`` (one token per row against the static KV cache, writing its K/V)
  and the combine of its splits;
* ``gemv``: the skinny GEMM of decode (bf16/fp16, FP8, int8 and int4 weights) and its ``kiln::gemv``
  operator ``engine_gemv``;
* ``int4``: the int4 weight-only GEMV kernels ``gemv`` dispatches to;
* ``dequantize``: integer weights dequantized for prefill's dense GEMM (``kiln::dequantize``);
* ``common``: what the GEMV kernels share (weight kinds, split-K helpers).

Everything here is checked against plain PyTorch in ``benchmarks/kernel_bench.py`` (on the GPU) and in
the GPU tests.
"""

from ..engine_quant import (  # noqa: F401 (the layout and the int4 kernel rules)
    int4_block_for,
    int4_fast_supported,
    int4_gemv_kernel,
    pack_int4_halves,
    unpack_int4_halves,
)
from .attention import decode_attention, decode_attention_supported, decode_splits  # noqa: F401
from .common import GEMV_MAX_ROWS, W_BF16, W_FP8, W_INT4, W_INT8  # noqa: F401
from .dequantize import dequantize, dequantize_op, engine_dequantize  # noqa: F401
from .gemv import engine_gemv, gemv, gemv_op  # noqa: F401
from .int4 import _ASM, _gemv_int4h, gemv_int4h, gemv_int4v, int4_words, pack_int4_k  # noqa: F401

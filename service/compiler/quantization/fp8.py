"""FP8 (E4M3, max 448) quantization: per-tensor weights + static per-tensor activations (``FP8``), and
per-channel weights + dynamic per-token activations (``FP8_PER_CHANNEL_PER_TOKEN``).

Scales follow ModelOpt/TensorRT-LLM: scale = amax / 448, q = saturate(x / scale) cast to E4M3
(clamp to +-448 before the cast; E4M3 has no infinity). The fused qkv weight is one tensor, so its
single scale is the common max of q, k and v.

``FP8`` weights are rounded by GPTQ by default (``gptq_fp8``; ``QuantConfig(fp8_gptq=False)`` gives
ModelOpt's plain round-to-nearest): the scale is still amax / 448, only *which* E4M3 value each weight
takes changes, chosen column by column so that the rounding error of the columns already quantized is
compensated by the columns not yet quantized, minimizing the layer-output error ||X Wᵀ - X Qᵀ||² on the
calibration inputs X (Frantar et al., 2022; llm-compressor's GPTQModifier applies it to FP8 schemes).
On SmolLM2-135M it cuts the weight part of FP8's KL to the float model by 3x. The activation part is
E4M3's 3-bit mantissa itself: a scale search (clipping) does not reduce it there, because the error is
relative to each value (measured; see benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .weight_only import div_exact

E4M3_MAX = 448.0
TINY = 1e-12


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Saturating cast of ``x / scale`` to E4M3 (``scale`` broadcasts)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def qdq_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return to_fp8(x, scale).float() * scale


def scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    a = torch.as_tensor(amax, dtype=torch.float32)
    return div_exact(a.clamp_min(TINY), E4M3_MAX).reshape(a.shape or (1,))


def quantize_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (fp8 weight, float32 scale of shape (1,))."""
    scale = scale_from_amax(w.float().abs().max()).reshape(1)
    return to_fp8(w, scale), scale


GPTQ_BLOCK = 128  # columns per lazy-update block
GPTQ_DAMP = 0.01  # diagonal damping, relative to the mean diagonal of H (GPTQ's percdamp)
GPTQ_CUDA_GRAPHS = True  # on a GPU, replay each block's column loop as a CUDA graph (same codes, less launch time)


def gptq_fp8(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, *, block: int = GPTQ_BLOCK,
             damp: float = GPTQ_DAMP, cuda_graphs: bool | None = None) -> torch.Tensor:
    """E4M3 codes of ``w`` [out, in] at a fixed ``scale`` (shape (1,), or [out] for row-stacked tensors
    that share an input), chosen by GPTQ with ``hessian`` = Σ xᵀx [in, in] of the calibration inputs.

    Columns are visited in decreasing order of their input energy (act-order: free here, the scale is
    per tensor); each column is rounded to E4M3 and its error, weighted by the inverse Hessian, is
    pushed onto the columns not yet rounded. Returns float8_e4m3fn codes of ``w``'s shape; the
    dequantized weight is ``codes * scale``, exactly what the engine multiplies by. On a GPU each
    block's column loop replays a CUDA graph (``cuda_graphs=False``, or ``GPTQ_CUDA_GRAPHS = False``:
    eager, the same codes)."""
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"gptq_fp8 needs w [out, in] and H [in, in], got {list(w.shape)} and {list(hessian.shape)}")
    W = w.float().clone()
    n = W.shape[1]
    s = scale.float().reshape(-1, 1).to(W.device)
    if s.shape[0] not in (1, W.shape[0]):
        raise ValueError(f"gptq_fp8 scale must have 1 or {W.shape[0]} entries, got {s.shape[0]}")
    H = hessian.float().clone().to(W.device)
    # Inputs never active in calibration: H[j, j] = 1 decouples them, so they are rounded to nearest.
    dead = (H.diagonal() == 0).nonzero().squeeze(1)
    H[dead, dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    mean_diag = float(H.diagonal().mean())
    for attempt in range(6):  # more damping until H is numerically positive definite
        L, info = torch.linalg.cholesky_ex(H + torch.eye(n, device=H.device) * (damp * 10 ** attempt * mean_diag))
        if int(info) == 0:
            hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                break
    else:
        raise ValueError("gptq_fp8: the calibration Hessian is not positive definite even with heavy damping")
    codes = torch.empty(W.shape, dtype=torch.float8_e4m3fn, device=W.device)
    s0 = s[:, 0]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        H1 = hinv[i1:i2, i1:i2]
        if W.is_cuda and (GPTQ_CUDA_GRAPHS if cuda_graphs is None else cuda_graphs):
            _graph_block(W1, E1, H1, s0)
        else:
            with _latency_bound(W.device):
                _gptq_block(W1, E1, H1, s0)
        codes[:, i1:i2] = to_fp8(W1, s)
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)]


def _gptq_block(W1: torch.Tensor, E1: torch.Tensor, H1: torch.Tensor, s0: torch.Tensor) -> None:
    """GPTQ's sequential loop over one block's columns, in place: each column is rounded to E4M3 and
    its error, weighted by the inverse Hessian, pushed onto the block's later columns (``E1``: the
    errors, for the lazy update of the columns after the block)."""
    for i in range(W1.shape[1]):
        w = W1[:, i]
        e = (w - qdq_fp8(w, s0)) / H1[i, i]
        W1[:, i:].addr_(e, H1[i, i:], alpha=-1.0)  # column i becomes its E4M3 value
        E1[:, i] = e


class _BlockGraph:
    """``_gptq_block`` captured once as a CUDA graph for one (rows, columns, scale) shape and replayed
    for every block of that shape: the loop is ~9 small kernels per column, launch-bound when run
    eagerly (about 0.1 ms a column, minutes for an 8B model); a replay runs the same kernels with the
    same launch parameters, so the codes are bit-identical to the eager loop's."""

    def __init__(self, W1: torch.Tensor, H1: torch.Tensor, s0: torch.Tensor):
        self.W1, self.H1, self.s0 = W1.clone(), H1.clone(), s0.clone()
        self.E1 = torch.empty_like(self.W1)
        side = torch.cuda.Stream(W1.device)
        side.wait_stream(torch.cuda.current_stream(W1.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (lazy initialization)
            _gptq_block(self.W1.clone(), torch.empty_like(self.W1), self.H1, self.s0)
        torch.cuda.current_stream(W1.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            _gptq_block(self.W1, self.E1, self.H1, self.s0)

    def run(self, W1: torch.Tensor, E1: torch.Tensor, H1: torch.Tensor, s0: torch.Tensor) -> None:
        self.W1.copy_(W1)
        self.H1.copy_(H1)
        self.s0.copy_(s0)
        self.graph.replay()
        W1.copy_(self.W1)
        E1.copy_(self.E1)


_GRAPHS: dict[tuple, _BlockGraph] = {}
_MAX_GRAPHS = 8  # distinct block shapes kept (an 8B Llama layer has 3: qkv, fc+gate, and o and proj alike)


def _graph_block(W1: torch.Tensor, E1: torch.Tensor, H1: torch.Tensor, s0: torch.Tensor) -> None:
    key = (W1.device, tuple(W1.shape), tuple(s0.shape))
    g = _GRAPHS.get(key)
    if g is None:
        if len(_GRAPHS) >= _MAX_GRAPHS:
            _GRAPHS.clear()
        g = _GRAPHS[key] = _BlockGraph(W1, H1, s0)
    g.run(W1, E1, H1, s0)


def release_graphs() -> None:
    """Drop the captured GPTQ block graphs (and their memory pools)."""
    _GRAPHS.clear()


@contextlib.contextmanager
def _latency_bound(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU for GPTQ's column loop: its ops are small vectors, and several
    threads only add synchronization (8x slower on a loaded 2-core machine)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def output_error(w: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> float:
    """Σ over the calibration inputs of ||x (W - Ŵ)ᵀ||², from H = Σ xᵀx."""
    d = (deq.float() - w.float()).to(hessian.device)
    return float(((d @ hessian.float()) * d).sum())


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (fp8 weight, float32 per-output-channel scale [out])."""
    scale = scale_from_amax(w.float().abs().amax(dim=1))
    return to_fp8(w, scale[:, None]), scale


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """What the engine's FP8 GEMM computes: both operands rounded to E4M3, fp32 accumulation, rescale.

    On a GPU with FP8 tensor cores (SM >= 8.9) this *is* an FP8 GEMM (``torch._scaled_mm``); elsewhere
    it is simulated in float32 with the same roundings."""
    if x.is_cuda and fp8_gemm_available(x.device):
        return scaled_mm_fp8(x, w8, w_scale, a_scale)
    xq = to_fp8(x, a_scale).float()
    return (xq @ w8.float().t()) * (a_scale * w_scale).reshape(-1)


def fp8_gemm_available(device: torch.device) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_fp8(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A real E4M3 x E4M3 GEMM on the GPU: x [..., in] (any float dtype), w8 [out, in] E4M3, float32 scales."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    pad = -m % 16  # the FP8 GEMM wants every dimension a multiple of 16
    xq = to_fp8(x2, a_scale.to(x.device))
    if pad:
        xq = torch.cat([xq, torch.zeros(pad, shape[-1], dtype=xq.dtype, device=xq.device)])
    y = torch._scaled_mm(xq, w8.to(x.device).t(), scale_a=a_scale.to(x.device).float().reshape(()),
                         scale_b=w_scale.to(x.device).float().reshape(()), out_dtype=out_dtype)
    return y[:m].reshape(*shape[:-1], w8.shape[0])


def fp8_rowwise_linear(x: torch.Tensor, w8: torch.Tensor, per_channel: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic activation scales times per-channel weight scales."""
    tok = scale_from_amax(x.float().abs().amax(dim=-1, keepdim=True))
    xq = to_fp8(x, tok).float()
    return (xq @ w8.float().t()) * tok * per_channel.reshape(-1)

"""The engine model: any ``ModelSpec`` (``models/spec.py``) over fused weights, a static KV cache and
per-layer step functions, resolved once at load.

Every family runs here: the Llama family, Qwen3, Gemma 1/2/3, GPT-2 / OPT and Nemotron-NAS (DeciLM)
are specs plus weight maps (``models/<family>.py``). A sliding-window layer's KV cache is a ring of
``min(window, max_seq_len)`` slots (a separate plan and step; full-attention layers are untouched). At construction each layer's ``Block`` becomes a ``Plan`` (a
tuple of constants: norm kind and placement, attention kind, rope, MLP kind, activation, ...) and a
step closure that calls the shared step functions with it; torch.compile specializes each function
on the plan's constants, so the compiled graphs hold only the ops of that plan (a Llama layer's
graphs are those of the Llama-only engine: fused qkv, ``gate_up`` = ``mlp.fc`` over ``mlp.gate``,
rope, the Triton decode attention between a compiled "norm + qkv + rope" part and a compiled "o_proj +
MLP" part on CUDA) and the decode loop is a list of steps with no per-token decisions. Layers of
different shapes or kinds get different compiled graphs of the same functions (DeciLM).

The weights are arguments, so one compiled layer serves every layer of its plan and a CUDA graph
captures the whole step. Batches are right-padded: every row starts at position 0, prefill is plain
causal attention (flash on GPU), and decode writes each row's K/V at its own position ``pos[b]`` and
masks slots > pos[b]. With tp > 1 each rank holds its heads / MLP columns / vocab rows, sums the
row-parallel outputs (biases added once, after the sum) and gathers the vocab.

A linear slot holds either a float tensor or a ``QLinear`` (``engine_quant.py``: FP8 / int8 / int4
weights of a quantized checkpoint); on CUDA linears of at most 16 rows run the Triton skinny GEMM.

Engine layouts (the weight maps, per family): ``kiln-llama-fused/1`` (also Qwen3), ``kiln-gpt-fused/1``,
``kiln-decilm-fused/1``, ``kiln-gemma-fused/1`` (its ``embed`` a vocabulary slice in a kept-tp
engine), ``kiln-phi3-fused/1`` (its ``gate_up`` slot holds the fused [up; gate] fc of a
plain swiglu MLP; longrope: a decode table switching to the long factors at the original length and an
all-long table for longer prefills, both built at load); per layer ``attn_norm`` (``_bias``), ``qkv`` (``_bias``) or ``attn_linear``,
``o`` (``_bias``), ``mlp_norm`` (``_bias``), ``gate_up`` / ``down`` (gated) or ``fc`` / ``proj``
(plain) or ``ffn_linear`` (with ``_bias``), ``q_norm`` / ``k_norm``, ``post_attn_norm`` /
``post_mlp_norm``, ``kv_scale``; ``embed``, ``pos_embed``, ``final_norm`` (``_bias``), ``lm_head``;
Mixture of Experts (``kiln-moe-fused/1``): ``router``, ``experts_gate_up`` [E_r, 2 x I_r, H] (each
expert [up; gate]), ``experts_down`` [E_r, H, I_r], ``shared_gate_up`` / ``shared_down`` /
``shared_gate``. A MoE layer routes as transformers does (softmax in float32, top-k, optional
renormalization); decode with few tokens multiplies each token by its top-k experts' weights gathered
from the stacked tensors (one fused gather-multiply-reduce under torch.compile, no loop over experts);
prefill (and decode of a batch whose tokens x top_k reach the expert count) runs each held expert once
over all tokens, weighted by the routing (zero for tokens not routed to it). Under expert parallelism a
rank holds experts [expert0, expert0 + E_r) and the tensor-parallel sum adds the other ranks' experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ..models import block_specs
from ..models.gemma import GEMMA_LAYOUT
from ..models.gpt import GPT_LAYOUT
from ..models.llama import ENGINE_LAYOUT
from ..models.moe import MOE_LAYOUT
from ..models.nemotron_nas import DECILM_LAYOUT
from ..models.phi3 import PHI3_LAYOUT, longrope_tables
from ..models.spec import ACTIVATION_NAMES, Block, ModelSpec, Rope
from .engine_quant import QLinear, load_qlinear, qdq_kv, qlinear_forward

ENGINE_LAYOUTS = (ENGINE_LAYOUT, GPT_LAYOUT, DECILM_LAYOUT, MOE_LAYOUT, PHI3_LAYOUT, GEMMA_LAYOUT)
LayerWeights = tuple  # LAYER_FIELDS, in order (None where a layer has no such tensor)
LAYER_FIELDS = ("attn_norm", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm", "gate_up", "gate_up_bias", "down",
                "down_bias", "kv_scale", "attn_norm_bias", "mlp_norm_bias", "q_norm", "k_norm", "post_attn_norm",
                "post_mlp_norm", "router", "experts_gate_up", "experts_down", "shared_gate_up", "shared_down",
                "shared_gate")
# engine tensor names a slot may hold, per layout: plain MLPs store fc / proj, linear replacements
# attn_linear (in the qkv slot) and ffn_linear (in the gate_up slot)
_SLOT_NAMES = {"qkv": ("qkv", "attn_linear"), "gate_up": ("gate_up", "fc", "ffn_linear"),
               "gate_up_bias": ("gate_up_bias", "fc_bias"), "down": ("down", "proj"), "down_bias": ("down_bias", "proj_bias")}
LINEAR_FIELDS = ("qkv", "o", "gate_up", "down")
GEMV_ROWS = 16
_gemv = None  # kernels.engine_gemv once an engine is placed on a CUDA device (Triton present)
_dequant = None  # kernels.engine_dequantize, likewise
_kernels = None


class Plan(NamedTuple):
    """A layer's static choices (constants to torch.compile): resolved from its ``Block``."""

    norm: str = "rms"
    placement: str = "pre"
    attn: str = "full"
    rope: bool = True
    qk_norm: bool = False
    scale: float | None = None
    softcap: float | None = None
    window: int = 0
    mlp: str = "gated"
    act: str = "silu"
    experts: int = 0  # moe: every expert (the router's width), experts per token, renormalize, shared expert
    top_k: int = 0
    renorm: bool = False
    shared: bool = False
    expert0: int = 0  # moe under expert parallelism: the first expert this rank holds


LLAMA_PLAN = Plan()


def plan_of(block: Block) -> Plan:
    a, m = block.attention, block.mlp
    return Plan(norm=block.norm.kind, placement=block.placement, attn=a.kind, rope=a.rope is not None,
                qk_norm=a.qk_norm is not None, scale=a.scale, softcap=a.softcap, window=int(a.window or 0),
                mlp=m.kind, act=m.act, experts=m.num_experts, top_k=m.top_k, renorm=m.renormalize,
                shared=bool(m.shared_size))


def _cuda_kernels():
    """The Triton kernels package, or None (no Triton / the KILN_ENGINE_KERNELS=0 switch)."""
    global _kernels, _gemv, _dequant
    if _kernels is None:
        import os

        if os.environ.get("KILN_ENGINE_KERNELS", "1") == "0":
            _kernels = False
        else:
            try:
                from . import kernels as k
            except ImportError:
                _kernels = False
            else:
                _kernels, _gemv, _dequant = k, k.engine_gemv, k.engine_dequantize
    return _kernels or None


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None, dense: bool = False) -> torch.Tensor:
    """x @ wᵀ (+ b) for a float weight or a QLinear; few rows on CUDA (decode): the Triton skinny GEMM.
    ``dense`` (prefill): always the dense GEMM, so the dynamic prefill graph has no row-count guard."""
    if isinstance(w, QLinear):
        return qlinear_forward(x, w, b, _gemv if (x.is_cuda and not dense) else None,
                               _dequant if x.is_cuda else None)
    if (_gemv is not None and not dense and x.is_cuda and x.numel() // x.shape[-1] <= GEMV_ROWS
            and w.dtype != torch.float32):
        return _gemv(x, w, bias=b)
    return F.linear(x, w, b)


def rope_inv_freq(cfg: dict) -> torch.Tensor:
    """Inverse frequencies for rope_gpt_neox, with linear or llama3 scaling (as transformers computes them)."""
    d = int(cfg.get("rotary_embedding_dim") or cfg["head_size"])
    base = float(cfg.get("rotary_base", 10000.0))
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling: dict = cfg.get("rotary_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(medium, smoothed, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"rope scaling {kind!r} is not supported by the engine")
    return inv.to(torch.float32)


# -- the ops ------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, w.shape, w, b, eps)


def norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float, kind: str = "rms") -> torch.Tensor:
    """RMSNorm (HF Llama's roundings), RMSNorm with a (1 + w) scale in float32 (Gemma), or LayerNorm."""
    if kind == "layernorm":
        return layer_norm(x, w, b, eps)
    if kind == "rms_1p":
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)
    return rms_norm(x, w, eps)


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """``act``: one of the spec's activations, or an HF name (gelu_new, gelu_pytorch_tanh, ...)."""
    act = ACTIVATION_NAMES.get(act, act)
    if act == "silu":
        return F.silu(x)
    if act == "relu":
        return F.relu(x)
    if act == "gelu":
        return F.gelu(x)  # exact erf form, HF's "gelu"
    if act == "swiglu":  # a plain MLP's fused [up; gate] fc (Phi-3)
        up, gate = x.chunk(2, -1)
        return F.silu(gate) * up
    return F.gelu(x, approximate="tanh")  # gelu_tanh


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotary over the first 2 x cos.shape[-1] dims of each head (partial rotary: the rest pass)."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
    return out if 2 * half == x.shape[-1] else torch.cat([out, x[..., 2 * half:]], -1)


def _row_parallel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, group, dense: bool = False) -> torch.Tensor:
    """x @ w.T summed over the tensor-parallel ranks (each holds a slice of the inputs); bias once."""
    y = linear(x, w, dense=dense)
    if group is not None:
        import torch.distributed._functional_collectives as funcol

        y = funcol.all_reduce(y, "sum", group)
    return y if b is None else y + b


def _residual(h: torch.Tensor, y: torch.Tensor, pre: torch.Tensor, pre_b: torch.Tensor | None,
              post: torch.Tensor, eps: float, p: Plan) -> torch.Tensor:
    """Add a part's output ``y`` to the residual: post-LN normalizes the sum with the part's norm,
    a sandwich normalizes ``y`` first with its post norm."""
    if p.placement == "post":
        return norm(h + y, pre, pre_b, eps, p.norm)
    if p.placement == "sandwich":
        y = norm(y, post, None, eps, p.norm)
    return h + y


def moe_route(x: torch.Tensor, router: torch.Tensor, top_k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k] in x's dtype, expert ids [N, k]) of tokens x [N, H]: softmax of the router
    logits in float32, top-k, renormalized to sum 1 when ``renorm`` (transformers' order)."""
    top, idx = torch.topk(torch.softmax(F.linear(x, router).float(), -1), top_k, dim=-1)
    if renorm:
        top = top / top.sum(-1, keepdim=True)
    return top.to(x.dtype), idx


def _moe(x: torch.Tensor, w: LayerWeights, group, dense: bool, p: Plan) -> torch.Tensor:
    """The Mixture-of-Experts MLP of x [..., H] (this rank's share, summed over the tp group)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    weights, idx = moe_route(x, w[17], p.top_k, p.renorm)
    gate_up, down = w[18], w[19]
    held = gate_up.shape[0]
    if dense or x.shape[0] * p.top_k >= held:
        # each held expert once over every token, weighted by the routing (0 where not routed)
        scale = torch.zeros(x.shape[0], p.experts, dtype=x.dtype, device=x.device).scatter(1, idx, weights)
        y = torch.zeros_like(x)
        for e in range(held):
            up, gate = F.linear(x, gate_up[e]).chunk(2, -1)
            y = y + F.linear(activation(gate, p.act) * up, down[e]) * scale[:, p.expert0 + e, None]
    else:
        # few tokens: each token times its top-k experts' weights, gathered from the stacked tensors
        local = idx - p.expert0
        mine = (local >= 0) & (local < held)
        sel = local.clamp(0, held - 1)
        h1 = (x[:, None, None, :] * gate_up[sel]).sum(-1)  # [N, k, 2I]: a gather-GEMV under Inductor
        up, gate = h1.chunk(2, -1)
        o = ((activation(gate, p.act) * up)[:, :, None, :] * down[sel]).sum(-1)  # [N, k, H]
        y = (o * (weights * mine)[..., None]).sum(1)
    if p.shared:
        up, gate = linear(x, w[20], dense=dense).chunk(2, -1)
        y = y + torch.sigmoid(F.linear(x, w[22])) * linear(activation(gate, p.act) * up, w[21], dense=dense)
    if group is not None:
        import torch.distributed._functional_collectives as funcol

        y = funcol.all_reduce(y, "sum", group)
    return y.view(shape)


def _mlp(h: torch.Tensor, w: LayerWeights, eps: float, group, dense: bool, p: Plan) -> torch.Tensor:
    """The MLP part with its norm and residual: gated (act(fc) * gate), plain, one linear, a Mixture
    of Experts, or none."""
    if p.mlp == "none":
        return h
    x = h if p.placement == "post" else norm(h, w[5], w[12], eps, p.norm)
    if p.mlp == "moe":
        return _residual(h, _moe(x, w, group, dense, p), w[5], w[12], w[16], eps, p)
    if p.mlp == "linear":
        y = linear(x, w[6], dense=dense)
    else:
        gu = linear(x, w[6], w[7], dense)
        if p.mlp == "gated":
            a, u = gu.chunk(2, -1)
            y = activation(a, p.act) * u
        else:
            y = activation(gu, p.act)
        y = _row_parallel(y, w[8], w[9], group, dense)
    return _residual(h, y, w[5], w[12], w[16], eps, p)


def _mlp_and_residual(h: torch.Tensor, attn: torch.Tensor, w: LayerWeights, eps: float, group=None,
                      dense: bool = False, p: Plan = LLAMA_PLAN) -> torch.Tensor:
    h = _residual(h, _row_parallel(attn, w[3], w[4], group, dense), w[0], w[11], w[15], eps, p)
    return _mlp(h, w, eps, group, dense, p)


def _linear_attention(h: torch.Tensor, w: LayerWeights, eps: float, group, dense: bool, p: Plan) -> torch.Tensor:
    """A layer whose attention is one linear layer (``attn_linear``) or absent, then its MLP."""
    if p.attn == "linear":
        x = h if p.placement == "post" else norm(h, w[0], w[11], eps, p.norm)
        h = _residual(h, linear(x, w[1], dense=dense), w[0], w[11], w[15], eps, p)
    return _mlp(h, w, eps, group, dense, p)


def _scores_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, p: Plan) -> torch.Tensor:
    """Attention with the scores spelled out (soft-capped logits); ``mask`` additive."""
    scale = p.scale if p.scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if p.softcap is not None:
        s = p.softcap * torch.tanh(s / p.softcap)
    return torch.matmul((s + mask).softmax(-1).to(v.dtype), v)


def _sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """F.scaled_dot_product_attention reading each KV head for its group of query heads in the kernel when
    k/v have fewer heads (GQA; no expanded copy). A Python branch: ``enable_gqa`` must be a bool."""
    if k.shape[1] != q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, p: Plan) -> torch.Tensor:
    """Attention of q [B, nh, Tq, d] over k/v [B, nkv, Tk, d]; fewer KV heads than query heads (GQA)
    are shared by consecutive query heads, as transformers' repeat_kv lays them out."""
    if p.softcap is not None:
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        return _scores_attention(q, k, v, mask, p)
    return _sdpa_gqa(q, k, v, attn_mask=mask, scale=p.scale)


def decode_qkv(h: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int, d: int,
               eps: float, kv_algo: str | None = None, p: Plan = LLAMA_PLAN
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, qkv (q/k norm) and rope of one token per row: q [B, nh, d], k and v [B, nkv, d]
    (contiguous), K/V rounded as the quantized KV cache stores them when kv_algo is set."""
    B = h.shape[0]
    x = h if p.placement == "post" else norm(h, w[0], w[11], eps, p.norm)
    qkv = linear(x, w[1], w[2])
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], -1)
    q = q.view(B, nh, d)
    if p.qk_norm:
        q = norm(q, w[13], None, eps, p.norm)
    if p.rope:
        q = apply_rope(q, cos[:, None], sin[:, None])
    k = k.view(B, nkv, d)
    if p.qk_norm:
        k = norm(k, w[14], None, eps, p.norm)
    if p.rope:
        k = apply_rope(k, cos[:, None], sin[:, None])
    k, v = qdq_kv(k, w[10], kv_algo), qdq_kv(v.reshape(B, nkv, d), w[10], kv_algo)
    return q.contiguous(), k.contiguous(), v.contiguous()


def decode_out(h: torch.Tensor, attn: torch.Tensor, w: LayerWeights, eps: float, group=None,
               p: Plan = LLAMA_PLAN) -> torch.Tensor:
    """o_proj, residual, MLP, residual of one token per row; attn [B, nh * d]."""
    return _mlp_and_residual(h, attn, w, eps, group, False, p)


def decode_layer(h: torch.Tensor, w: LayerWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                 nh: int, nkv: int, d: int, eps: float, group=None, kv_algo: str | None = None,
                 p: Plan = LLAMA_PLAN) -> torch.Tensor:
    """One token per row. h [B, H]; caches [B, nkv, S, d]; pos [B]; cos/sin [B, d/2]; mask [B, 1, 1, S]."""
    if p.attn in ("linear", "none"):
        return _linear_attention(h, w, eps, group, False, p)
    B = h.shape[0]
    q, k, v = decode_qkv(h, w, cos, sin, nh, nkv, d, eps, kv_algo, p)
    rows = torch.arange(B, device=h.device)
    if p.attn == "sliding":  # a ring of the last ``window`` positions: position pos lives in slot pos % span
        pos = pos % k_cache.shape[2]
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    # GQA without repeating K/V: the g query heads of a KV head are g "query positions" of it
    attn = _sdpa(q.view(B, nkv, nh // nkv, d), k_cache, v_cache, mask, p)
    return _mlp_and_residual(h, attn.reshape(B, nh * d), w, eps, group, False, p)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, p: Plan = LLAMA_PLAN, ring: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, nh, T, d], k/v [B, nkv, T, d] (already rounded as the cache stores them) are written to
    cache slots [0, T) (a sliding layer's ring of S slots: slot s of row b takes position ``ring[b, s]``,
    the last position < length[b] that is s mod S); causal attention (a sliding window: only the last
    ``window`` positions), GQA without repeating the KV heads; returns [B, T, nh * d]."""
    B, nh, T, d = q.shape
    if p.attn == "sliding":
        assert ring is not None
        idx = ring[:, None, :, None].expand(B, k.shape[1], ring.shape[1], d)
        k_cache.copy_(k.gather(2, idx))
        v_cache.copy_(v.gather(2, idx))
    else:
        k_cache[:, :, :T] = k
        v_cache[:, :, :T] = v
    if p.attn == "full" and p.softcap is None and p.scale is None:
        attn = _sdpa_gqa(q, k, v, is_causal=True)
    else:
        i = torch.arange(T, device=q.device)
        seen = i[None, :] <= i[:, None]
        if p.attn == "sliding":
            seen = seen & (i[None, :] > i[:, None] - p.window)
        mask = torch.zeros((), dtype=torch.float32 if p.softcap is not None else q.dtype,
                           device=q.device).masked_fill(~seen, float("-inf"))
        attn = _sdpa(q, k, v, mask, p)
    return attn.transpose(1, 2).reshape(B, T, nh * d)


def _dynamic(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Mark dims of a prefill input as symbolic for torch.compile (batch rows, prompt tokens): one graph
    serves every batch and prompt length, while weights and widths stay static shapes (dynamic=True made
    every dim of every input symbolic: slower tracing at load, generic kernels). A no-op when eager."""
    for d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d)
    return t


def _rows(cache: torch.Tensor, row0: int, B: int) -> torch.Tensor:
    """Cache rows [row0, row0 + B) of one layer, the batch dim symbolic like the prefill's other inputs."""
    return _dynamic(cache[row0:row0 + B], 0)


def _row_tables(long_rows: torch.Tensor, short: tuple[torch.Tensor, torch.Tensor],
                long: tuple[torch.Tensor, torch.Tensor], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row rope tables [B, T, d/2]: the long ones for rows flagged in ``long_rows`` [B], else the short."""
    pick = long_rows[:, None, None]
    return torch.where(pick, long[0][None, :T], short[0][None, :T]), torch.where(pick, long[1][None, :T], short[1][None, :T])


def prefill_layer(h: torch.Tensor, w: LayerWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int, d: int, eps: float,
                  group=None, kv_algo: str | None = None, p: Plan = LLAMA_PLAN,
                  ring: torch.Tensor | None = None) -> torch.Tensor:
    """A right-padded batch from position 0. h [B, T, H]; caches [B, nkv, S, d]; cos/sin [T, d/2], or
    [B, T, d/2] when rows take different tables (longrope: each row by its own length)."""
    if p.attn in ("linear", "none"):
        return _linear_attention(h, w, eps, group, True, p)
    B, T, _ = h.shape
    if p.rope:
        cos, sin = (cos[None, :, None], sin[None, :, None]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    x = h if p.placement == "post" else norm(h, w[0], w[11], eps, p.norm)
    qkv = linear(x, w[1], w[2], dense=True)
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], -1)
    q = q.view(B, T, nh, d)
    if p.qk_norm:
        q = norm(q, w[13], None, eps, p.norm)
    if p.rope:
        q = apply_rope(q, cos, sin)
    q = q.transpose(1, 2)
    k = k.view(B, T, nkv, d)
    if p.qk_norm:
        k = norm(k, w[14], None, eps, p.norm)
    if p.rope:
        k = apply_rope(k, cos, sin)
    k = k.transpose(1, 2)
    v = v.view(B, T, nkv, d).transpose(1, 2)
    k, v = qdq_kv(k, w[10], kv_algo), qdq_kv(v, w[10], kv_algo)
    attn = prefill_attention(q, k, v, k_cache, v_cache, p, ring)
    return _mlp_and_residual(h, attn, w, eps, group, True, p)


def decode_mask(slots: torch.Tensor, pos: torch.Tensor, kv: int, dtype: torch.dtype, window: int = 0) -> torch.Tensor:
    """Additive decode mask [B, 1, 1, kv], built once per step (not per layer): 0 for slots <= pos[b]
    (and > pos[b] - window for a sliding window), -inf elsewhere."""
    if window:
        hidden = (slots[None, :kv] > pos[:, None]) | (slots[None, :kv] <= pos[:, None] - window)
        return torch.zeros((), dtype=dtype, device=slots.device).masked_fill(hidden, float("-inf"))[:, None, None, :]
    return torch.zeros((), dtype=dtype, device=slots.device).masked_fill(
        slots[None, :kv] > pos[:, None], float("-inf"))[:, None, None, :]


def ring_positions(lengths: torch.Tensor, span: int, T: int) -> torch.Tensor:
    """[B, span]: the prompt position each ring slot of a sliding layer holds after prefill, the last
    position < lengths[b] congruent to the slot mod span (clamped to [0, T) where there is none yet:
    such a slot is masked until decoding writes it)."""
    s = torch.arange(span, device=lengths.device)
    last = lengths[:, None].long() - 1 - s[None, :]
    return (s[None, :] + span * torch.div(last, span, rounding_mode="floor")).clamp(0, T - 1)


def parallel_embedding(ids: torch.Tensor, table: torch.Tensor, first: int, group) -> torch.Tensor:
    """TensorRT-LLM's vocab-parallel embedding: this rank holds rows [first, first + rows) of the
    (padded) vocabulary; rows it lacks are zero here and come from their rank through the sum."""
    import torch.distributed._functional_collectives as funcol

    local = ids - first
    inside = (local >= 0) & (local < table.shape[0])
    h = F.embedding(local.clamp(0, table.shape[0] - 1), table) * inside[..., None].to(table.dtype)
    return funcol.all_reduce(h, "sum", group)


def gather_vocab(logits: torch.Tensor, group, vocab: int) -> torch.Tensor:
    """Tensor parallel: each rank holds a slice of the (padded) vocab; gather and cut the padding."""
    if group is None:
        return logits
    import torch.distributed._functional_collectives as funcol

    parts = funcol.all_gather_tensor(logits.movedim(-1, 0).contiguous(), 0, group)
    return parts.movedim(0, -1)[..., :vocab]


def lm_head(h: torch.Tensor, norm_w: torch.Tensor | None, head: torch.Tensor, eps: float,
            norm_b: torch.Tensor | None = None, kind: str = "rms", softcap: float | None = None) -> torch.Tensor:
    if norm_w is not None:
        h = norm(h, norm_w, norm_b, eps, kind)
    logits = linear(h, head).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def compile_kwargs(mode: str | None, options: dict | None) -> dict:
    """The torch.compile settings of the engine model (and the Dynamo settings it needs)."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    # No duck sizing: a prompt length equal to some other size (head_size 128, say) must not
    # produce a different prefill graph, or a fresh process misses the shipped compile cache.
    fx_config.use_duck_shape = False
    # one compiled graph per decode (batch, kv) bucket plus the dynamic prefill; never fall back silently
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)
    kw: dict = {"fullgraph": True}
    if options:
        kw["options"] = options
    elif mode:
        kw["mode"] = mode
    return kw


def check_engine_spec(spec: ModelSpec, tp_size: int = 1) -> ModelSpec:
    """Refuse, before any weight is placed, what the spec asks and the engine does not run."""
    spec.check("the torch engine")
    # layers that differ only in their attention span or rope (Gemma's sliding / global) split alike
    heterogeneous = len({(b.attention.num_heads, b.attention.num_kv_heads, b.attention.head_size, b.attention.kind
                          in ("full", "sliding"), b.mlp) for b in spec.blocks}) > 1
    if tp_size > 1 and heterogeneous:
        raise ValueError(f"{spec.architecture} engines with heterogeneous layers run as one rank "
                         "(tp checkpoints are merged at build time)")
    return spec


class _Layer(NamedTuple):
    plan: Plan
    nh: int
    nkv: int
    d: int
    eps: float
    cache: int  # index into k_cache / v_cache, -1 without attention
    rope: int  # index into the rope tables, -1 without rope
    ring: int = 0  # a sliding layer's cache span (min(window, max_seq) slots, a ring); 0: full attention


class EngineModel:
    """Weights (engine layout) + static KV cache + the step functions of a ModelSpec, optionally compiled."""

    def __init__(self, cfg: dict, weights: dict[str, torch.Tensor], *, max_batch: int, max_seq: int,
                 tp_group=None, tp_size: int = 1, spec: ModelSpec | None = None):
        """With ``tp_size`` > 1 the weights are this rank's slice (TensorRT-LLM's split: heads, KV heads
        duplicated below tp, MLP columns, vocab-padded lm_head rows) and ``tp_group`` sums the
        row-parallel outputs and gathers the vocab."""
        self.cfg, self.group, self.tp = cfg, tp_group, tp_size
        self.spec = spec = check_engine_spec(spec or block_specs(cfg), tp_size)
        self.vocab = spec.vocab_size
        self.max_batch, self.max_seq = max_batch, max_seq
        self.embed = weights["embed"]
        self.device, self.dtype = self.embed.device, self.embed.dtype
        quant = cfg.get("quantization") or {}
        self.kv_algo = quant.get("kv_cache_quant_algo") if quant.get("kv_cache_quant_algo") else None
        self.pos_embed = weights.get("pos_embed") if spec.learned_positions else None
        if spec.learned_positions and (self.pos_embed is None or max_seq > self.pos_embed.shape[0]):
            rows = None if self.pos_embed is None else self.pos_embed.shape[0]
            raise ValueError(f"max_seq_len={max_seq} exceeds the {rows} learned positions")
        self.embed_scale = (torch.tensor(spec.embedding_scale, dtype=self.dtype, device=self.device)
                            if spec.embedding_scale is not None else None)
        self.embed_first: int | None = None  # a vocab-parallel embedding's first row (kept-tp Gemma)
        if tp_size > 1 and self.embed.shape[0] != self.vocab:
            import torch.distributed as dist

            self.embed_first = dist.get_rank(tp_group) * self.embed.shape[0]
        self.layers: list[LayerWeights] = []
        self.plans: list[_Layer] = []
        expert0 = self._expert_rank(cfg, weights, tp_group, tp_size)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.cache_layers: list[int] = []
        ropes: list[Rope] = []
        for i, b in enumerate(spec.blocks):
            self.layers.append(self._layer_weights(weights, i, quant))
            a = b.attention
            cache, rope, ring = -1, -1, 0
            nh = nkv = d = 0
            if a.kind in ("full", "sliding"):
                nh, nkv, d = a.num_heads // tp_size, max(a.num_kv_heads // tp_size, 1), a.head_size
                cache = len(self.k_cache)
                ring = min(int(a.window or 0), max_seq) if a.kind == "sliding" else 0
                shape = (max_batch, nkv, ring or max_seq, d)
                self.k_cache.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
                self.v_cache.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
                self.cache_layers.append(i)
                if a.rope is not None:
                    if a.rope not in ropes:
                        ropes.append(a.rope)
                    rope = ropes.index(a.rope)
            plan = plan_of(b)
            if plan.mlp == "moe":
                plan = plan._replace(expert0=expert0 * self.layers[-1][18].shape[0])
            self.plans.append(_Layer(plan, nh, nkv, d, b.norm.eps, cache, rope, ring))
        if self.kv_algo and any(w[10] is None for w, lp in zip(self.layers, self.plans, strict=True) if lp.cache >= 0):
            raise ValueError(f"kv_cache_quant_algo {self.kv_algo} but the engine lacks layers.*.kv_scale")
        self.final_norm, self.final_norm_bias = weights.get("final_norm"), weights.get("final_norm_bias")
        fn = spec.final_norm
        if fn is not None and (self.final_norm is None or (fn.bias and self.final_norm_bias is None)):
            raise ValueError("the engine lacks final_norm" + ("_bias" if fn.bias else ""))
        self.final_norm_kind = fn.kind if fn is not None else "rms"
        self.eps = fn.eps if fn is not None else (spec.blocks[0].norm.eps if spec.blocks else 1e-5)
        self.head = weights["lm_head"][: self.vocab] if tp_size == 1 else weights["lm_head"]
        self.rope_tables: list[tuple[torch.Tensor, torch.Tensor]] = []
        # longrope: decode rows switch to the long factors at the original length; a prefill longer than
        # it takes the long table for every row (transformers' per-forward choice), resolved here
        self._long_prefill: list[tuple[int, torch.Tensor, torch.Tensor] | None] = []
        t = torch.arange(max_seq, dtype=torch.float32)
        for r in ropes:
            sc = r.scaling_dict or {}
            if sc.get("rope_type") == "longrope":
                cos, sin = longrope_tables(r, max_seq)
                self.rope_tables.append((cos.to(self.device), sin.to(self.device)))
                lc, ls = longrope_tables(r, max_seq, long=True)
                self._long_prefill.append((int(sc["original_max_position_embeddings"]), lc.to(self.device),
                                           ls.to(self.device)))
                continue
            freqs = torch.outer(t, rope_inv_freq({"head_size": r.dim, "rotary_base": r.base,
                                                   "rotary_scaling": r.scaling_dict}))
            self.rope_tables.append((freqs.cos().to(self.device), freqs.sin().to(self.device)))
            self._long_prefill.append(None)
        self._has_longrope = any(x is not None for x in self._long_prefill)
        # transformers' Phi-3 generate() recomputes the whole cache once, when the sequence first grows past
        # original_max_position_embeddings (so every key then carries the long factors): the position at
        # which Engine.generate re-prefills a row, or None
        self.recompute_at: int | None = next((x[0] for x in self._long_prefill if x is not None), None)
        self.slots = torch.arange(max_seq, device=self.device)
        # CUDA: Triton decode attention (+ skinny GEMMs) for plain full-attention layers; SDPA elsewhere
        self.kernels = _cuda_kernels() if self.device.type == "cuda" else None
        self._kernel_layers = [self.kernels is not None and lp.cache >= 0 and lp.plan.attn == "full"
                               and lp.plan.softcap is None and lp.plan.scale is None
                               and self.kernels.decode_attention_supported(lp.d, self.dtype) for lp in self.plans]
        # decode masks the SDPA layers need (one per cache span: 0 = full, else a ring's), built once per step
        self._mask_windows = sorted({lp.ring for lp, k in zip(self.plans, self._kernel_layers, strict=True)
                                     if lp.cache >= 0 and not k})
        self._rings = sorted({lp.ring for lp in self.plans if lp.ring})
        self._fn: dict[str, Callable[..., Any]] = {
            "decode_layer": decode_layer, "decode_qkv": decode_qkv, "decode_out": decode_out,
            "prefill_layer": prefill_layer}
        self._head: Callable[..., torch.Tensor] = lm_head
        self._resolve()

    @staticmethod
    def _expert_rank(cfg: dict, weights: dict, group, tp_size: int) -> int:
        """This rank's expert-parallel rank (TensorRT-LLM's tp_rank % moe_ep_size); 0 when not split."""
        if tp_size == 1 or group is None:
            return 0
        import torch.distributed as dist

        from ..checkpoint.mapping import Mapping

        return dist.get_rank(group) % Mapping.from_dict(cfg.get("mapping") or {"tp_size": tp_size}).moe_ep

    def _layer_weights(self, weights: dict, i: int, quant: dict) -> LayerWeights:
        fields = []
        for f in LAYER_FIELDS:
            q = None
            if f in LINEAR_FIELDS and quant.get("quant_algo"):
                q = load_qlinear(weights, f"layers.{i}.{f}", quant)
            if q is None:
                q = next((weights[f"layers.{i}.{n}"] for n in _SLOT_NAMES.get(f, (f,)) if f"layers.{i}.{n}" in weights),
                         None)
            fields.append(q)
        return tuple(fields)

    # -- resolution: one step closure per layer, no per-token decisions ----------------------------
    def _resolve(self) -> None:
        self._decode_steps = [self._decode_step(i) for i in range(len(self.layers))]
        self._prefill_steps = [self._prefill_step(i) for i in range(len(self.layers))]

    def _decode_step(self, i: int) -> Callable[..., torch.Tensor]:
        w, (p, nh, nkv, d, eps, c, r, ring) = self.layers[i], self.plans[i]
        group, kv_algo = self.group, self.kv_algo
        if c < 0:
            layer = self._fn["decode_layer"]
            return lambda h, pos, ropes, masks, kv, B: layer(h, w, None, None, pos, None, None, None, 0, 0, 0, eps,
                                                             group, None, p)
        kc, vc = self.k_cache[c], self.v_cache[c]
        if self._kernel_layers[i]:
            assert self.kernels is not None
            qkv, out, attention = self._fn["decode_qkv"], self._fn["decode_out"], self.kernels.decode_attention

            def kernel_step(h, pos, ropes, masks, kv, B):
                cos, sin = ropes[r]
                q, k, v = qkv(h, w, cos, sin, nh, nkv, d, eps, kv_algo, p)
                return out(h, attention(q, k, v, kc, vc, pos, kv), w, eps, group, p)
            return kernel_step
        layer = self._fn["decode_layer"]
        if ring:
            def ring_step(h, pos, ropes, masks, kv, B):
                cos, sin = ropes[r]
                span = min(kv, ring)
                return layer(h, w, kc[:B, :, :span], vc[:B, :, :span], pos, cos, sin, masks[ring], nh, nkv, d, eps,
                             group, kv_algo, p)
            return ring_step

        def step(h, pos, ropes, masks, kv, B):
            cos, sin = ropes[r]
            return layer(h, w, kc[:B, :, :kv], vc[:B, :, :kv], pos, cos, sin, masks[0], nh, nkv, d, eps,
                         group, kv_algo, p)
        return step

    def _prefill_step(self, i: int) -> Callable[..., torch.Tensor]:
        w, (p, nh, nkv, d, eps, c, r, ring) = self.layers[i], self.plans[i]
        group, kv_algo, layer = self.group, self.kv_algo, self._fn["prefill_layer"]
        if c < 0:
            return lambda h, ropes, rings, row0, B: layer(h, w, None, None, None, None, 0, 0, 0, eps, group, None, p)
        kc, vc = self.k_cache[c], self.v_cache[c]
        if ring:
            def ring_step(h, ropes, rings, row0, B):
                cos, sin = ropes[r]
                return layer(h, w, _rows(kc, row0, B), _rows(vc, row0, B), cos, sin, nh, nkv, d, eps, group, kv_algo,
                             p, rings[ring])
            return ring_step

        def step(h, ropes, rings, row0, B):
            cos, sin = ropes[r]
            return layer(h, w, _rows(kc, row0, B), _rows(vc, row0, B), cos, sin, nh, nkv, d, eps, group, kv_algo, p)
        return step

    def compile(self, mode: str | None = None, options: dict | None = None) -> None:
        kw = compile_kwargs(mode, options)
        self._fn = {"decode_layer": torch.compile(decode_layer, dynamic=False, **kw),
                    "decode_qkv": torch.compile(decode_qkv, dynamic=False, **kw),
                    "decode_out": torch.compile(decode_out, dynamic=False, **kw),
                    # batch and prompt length symbolic (marked in prefill), weights and every width static
                    "prefill_layer": torch.compile(prefill_layer, **kw)}
        self._head = torch.compile(lm_head, dynamic=False, **kw)
        self._resolve()

    # -- the steps ---------------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor, positions: torch.Tensor | None, T: int = 0) -> torch.Tensor:
        if self.embed_first is not None:
            h = parallel_embedding(ids, self.embed, self.embed_first, self.group)
        else:
            h = F.embedding(ids, self.embed)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        if self.pos_embed is not None:
            h = h + (F.embedding(positions, self.pos_embed) if positions is not None else self.pos_embed[:T])
        return h

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, kv: int | None = None) -> torch.Tensor:
        """ids, pos [B] -> float32 logits [B, vocab]; writes K/V at pos. Attention reads only the
        first ``kv`` cache slots (every pos must be < kv), so short contexts do not pay for max_seq_len."""
        B = ids.shape[0]
        kv = kv or self.max_seq
        h = self._embed(ids, pos)
        ropes = [(cos[pos], sin[pos]) for cos, sin in self.rope_tables] + [(None, None)]
        masks = {w: decode_mask(self.slots, pos, min(kv, w) if w else kv, self.dtype) for w in self._mask_windows}
        for step in self._decode_steps:
            h = step(h, pos, ropes, masks, kv, B)
        return self._gather_vocab(self._head(h, self.final_norm, self.head, self.eps, self.final_norm_bias,
                                             self.final_norm_kind, self.spec.final_softcap))

    def _gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_vocab(logits, self.group, self.vocab)

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, *, all_logits: bool = False,
                row0: int = 0) -> torch.Tensor:
        """ids [B, T] right-padded, lengths [B] -> float32 logits of each row's last token [B, vocab]
        (or of every token [B, T, vocab]); K/V go to cache rows [row0, row0 + B)."""
        B, T = ids.shape
        h = _dynamic(self._embed(ids, None, T), 0, 1)
        # longrope: each row takes the long factors when its own length passes the original one (what
        # transformers does for that row alone), so a row's tokens do not depend on its batch-mates
        tables = [(cos[:T], sin[:T]) if long is None else _row_tables(lengths > long[0], (cos, sin), long[1:], T)
                  for (cos, sin), long in zip(self.rope_tables, self._long_prefill, strict=True)]
        ropes: list = [(_dynamic(c, *range(c.dim() - 1)), _dynamic(s, *range(s.dim() - 1))) for c, s in tables]
        ropes.append((None, None))
        rings = {s: _dynamic(ring_positions(lengths, s, T), 0) for s in self._rings}
        for step in self._prefill_steps:
            h = step(h, ropes, rings, row0, B)
        if not all_logits:
            h = h[torch.arange(B, device=h.device), lengths - 1]
        return self._gather_vocab(lm_head(h, self.final_norm, self.head, self.eps, self.final_norm_bias,  # eager
                                          self.final_norm_kind, self.spec.final_softcap))

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

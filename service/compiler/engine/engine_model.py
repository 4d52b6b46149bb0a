"""The Llama-family engine model: fused weights, a static KV cache and per-layer step functions.

The engine layout fuses what the checkpoint keeps apart: ``qkv`` is already one matrix, and
``gate_up`` stacks ``mlp.fc`` (the activated branch) over ``mlp.gate``, so a decode step runs two
matrix-vector products per layer where HF runs five. One ``decode_layer`` / ``prefill_layer``
function serves every layer (weights are arguments), so torch.compile compiles one layer, not
32 copies of it, and a CUDA graph captures the whole step, launch gaps included.

Batches are right-padded: every row starts at position 0, prefill is plain causal attention (flash
on GPU), and decode writes each row's K/V at its own position ``pos[b]`` and masks slots > pos[b].

On CUDA the decode step runs Triton kernels (``kernels.py``): the attention of a token against the
cache (which also writes its K/V) between a compiled "norm + qkv + rope" part and a compiled "o_proj +
MLP" part, and skinny GEMMs for every linear with at most 16 rows. A linear slot holds either a float
tensor or a ``QLinear`` (``engine_quant.py``: FP8 / int8 / int4 weights of a quantized checkpoint).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .engine_quant import QLinear, load_qlinear, qdq_kv, qlinear_forward

ENGINE_LAYOUT = "kiln-llama-fused/1"
LayerWeights = tuple  # (attn_norm, qkv, qkv_bias, o, o_bias, mlp_norm, gate_up, gate_up_bias, down, down_bias, kv_scale)
LAYER_FIELDS = ("attn_norm", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm", "gate_up", "gate_up_bias", "down",
                "down_bias", "kv_scale")
LINEAR_FIELDS = ("qkv", "o", "gate_up", "down")
GEMV_ROWS = 16
_gemv = None  # kernels.engine_gemv once an engine is placed on a CUDA device (Triton present)
_dequant = None  # kernels.engine_dequantize, likewise
_kernels = None


def _cuda_kernels():
    """The Triton kernels module, or None (no Triton / the KILN_ENGINE_KERNELS=0 switch)."""
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


def checkpoint_to_engine_table(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(engine tensor, checkpoint tensors concatenated along dim 0), global layer indices; a table."""
    table: list[tuple[str, tuple[str, ...]]] = [("embed", ("transformer.vocab_embedding.weight",))]
    for i in range(int(cfg["num_hidden_layers"])):
        p, e = f"transformer.layers.{i}.", f"layers.{i}."
        table += [
            (e + "attn_norm", (p + "input_layernorm.weight",)),
            (e + "qkv", (p + "attention.qkv.weight",)),
            (e + "o", (p + "attention.dense.weight",)),
            (e + "mlp_norm", (p + "post_layernorm.weight",)),
            (e + "gate_up", (p + "mlp.fc.weight", p + "mlp.gate.weight")),  # fc = silu branch, first
            (e + "down", (p + "mlp.proj.weight",)),
        ]
        if cfg.get("attn_bias"):
            table.append((e + "qkv_bias", (p + "attention.qkv.bias",)))
            if cfg["architecture"] != "Qwen2ForCausalLM":
                table.append((e + "o_bias", (p + "attention.dense.bias",)))
        if cfg.get("mlp_bias"):
            table += [
                (e + "gate_up_bias", (p + "mlp.fc.bias", p + "mlp.gate.bias")),
                (e + "down_bias", (p + "mlp.proj.bias",)),
            ]
    table += [("final_norm", ("transformer.ln_f.weight",)), ("lm_head", ("lm_head.weight",))]
    return table


def rope_inv_freq(cfg: dict) -> torch.Tensor:
    """Inverse frequencies for rope_gpt_neox, with linear or llama3 scaling (as transformers computes them)."""
    d = int(cfg.get("rotary_embedding_dim") or cfg["head_size"])
    base = float(cfg.get("rotary_base", 10000.0))
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = cfg.get("rotary_scaling") or None
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
    elif kind is not None:
        raise ValueError(f"rope scaling {kind!r} is not supported by the engine")
    return inv.to(torch.float32)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def _row_parallel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, group, dense: bool = False) -> torch.Tensor:
    """x @ w.T summed over the tensor-parallel ranks (each holds a slice of the inputs); bias once."""
    y = linear(x, w, dense=dense)
    if group is not None:
        import torch.distributed._functional_collectives as funcol

        y = funcol.all_reduce(y, "sum", group)
    return y if b is None else y + b


def _mlp_and_residual(h: torch.Tensor, attn: torch.Tensor, w: LayerWeights, eps: float, group=None,
                      dense: bool = False) -> torch.Tensor:
    wo, bo, ln2, w13, b13, w2, b2 = w[3:10]
    h = h + _row_parallel(attn, wo, bo, group, dense)
    gu = linear(rms_norm(h, ln2, eps), w13, b13, dense)
    a, u = gu.chunk(2, -1)
    return h + _row_parallel(F.silu(a) * u, w2, b2, group, dense)


def decode_layer(h: torch.Tensor, w: LayerWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                 nh: int, nkv: int, d: int, eps: float, group=None, kv_algo: str | None = None) -> torch.Tensor:
    """One token per row. h [B, H]; caches [B, nkv, S, d]; pos [B]; cos/sin [B, d/2]; mask [B, 1, 1, S]."""
    B = h.shape[0]
    q, k, v = decode_qkv(h, w, cos, sin, nh, nkv, d, eps, kv_algo)
    rows = torch.arange(B, device=h.device)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    # GQA without repeating K/V: the g query heads of a KV head are g "query positions" of it
    attn = F.scaled_dot_product_attention(q.view(B, nkv, nh // nkv, d), k_cache, v_cache, attn_mask=mask)
    return _mlp_and_residual(h, attn.reshape(B, nh * d), w, eps, group)


def decode_qkv(h: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int, d: int,
               eps: float, kv_algo: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, qkv and rope of one token per row: q [B, nh, d], k and v [B, nkv, d] (contiguous), K/V
    rounded as the quantized KV cache stores them when kv_algo is set."""
    B = h.shape[0]
    qkv = linear(rms_norm(h, w[0], eps), w[1], w[2])
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], -1)
    q = apply_rope(q.view(B, nh, d), cos[:, None], sin[:, None])
    k = apply_rope(k.view(B, nkv, d), cos[:, None], sin[:, None])
    k, v = qdq_kv(k, w[10], kv_algo), qdq_kv(v.reshape(B, nkv, d), w[10], kv_algo)
    return q.contiguous(), k.contiguous(), v.contiguous()


def decode_out(h: torch.Tensor, attn: torch.Tensor, w: LayerWeights, eps: float, group=None) -> torch.Tensor:
    """o_proj, residual, MLP, residual of one token per row; attn [B, nh * d]."""
    return _mlp_and_residual(h, attn, w, eps, group)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor) -> torch.Tensor:
    """Prefill attention of every engine model: q [B, nh, T, d], k/v [B, nkv, T, d] (already rounded
    as the cache stores them) are written to cache slots [0, T); causal SDPA with the KV heads repeated
    for GQA; returns [B, T, nh * d]."""
    B, nh, T, d = q.shape
    k_cache[:, :, :T] = k
    v_cache[:, :, :T] = v
    if k.shape[1] != nh:
        k = k.repeat_interleave(nh // k.shape[1], 1)
        v = v.repeat_interleave(nh // v.shape[1], 1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.transpose(1, 2).reshape(B, T, nh * d)


def compile_kwargs(mode: str | None, options: dict | None) -> dict:
    """The torch.compile settings every engine model uses (and the Dynamo settings they need)."""
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


def prefill_layer(h: torch.Tensor, w: LayerWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int, d: int, eps: float,
                  group=None, kv_algo: str | None = None) -> torch.Tensor:
    """A right-padded batch from position 0. h [B, T, H]; caches [B, nkv, S, d]; cos/sin [T, d/2]."""
    B, T, _ = h.shape
    qkv = linear(rms_norm(h, w[0], eps), w[1], w[2], dense=True)
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], -1)
    q = apply_rope(q.view(B, T, nh, d), cos[None, :, None], sin[None, :, None]).transpose(1, 2)
    k = apply_rope(k.view(B, T, nkv, d), cos[None, :, None], sin[None, :, None]).transpose(1, 2)
    v = v.view(B, T, nkv, d).transpose(1, 2)
    k, v = qdq_kv(k, w[10], kv_algo), qdq_kv(v, w[10], kv_algo)
    attn = prefill_attention(q, k, v, k_cache, v_cache)
    return _mlp_and_residual(h, attn, w, eps, group, dense=True)


def decode_mask(slots: torch.Tensor, pos: torch.Tensor, kv: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive decode mask [B, 1, 1, kv], built once per step (not per layer): 0 for slots <= pos[b],
    -inf beyond."""
    return torch.zeros((), dtype=dtype, device=slots.device).masked_fill(
        slots[None, :kv] > pos[:, None], float("-inf"))[:, None, None, :]


def gather_vocab(logits: torch.Tensor, group, vocab: int) -> torch.Tensor:
    """Tensor parallel: each rank holds a slice of the (padded) vocab; gather and cut the padding."""
    if group is None:
        return logits
    import torch.distributed._functional_collectives as funcol

    parts = funcol.all_gather_tensor(logits.movedim(-1, 0).contiguous(), 0, group)
    return parts.movedim(0, -1)[..., :vocab]


def lm_head(h: torch.Tensor, norm: torch.Tensor, head: torch.Tensor, eps: float) -> torch.Tensor:
    return linear(rms_norm(h, norm, eps), head).float()


class EngineModel:
    """Weights (engine layout) + static KV cache + the step functions, optionally compiled."""

    def __init__(self, cfg: dict, weights: dict[str, torch.Tensor], *, max_batch: int, max_seq: int,
                 tp_group=None, tp_size: int = 1):
        """With ``tp_size`` > 1 the weights are this rank's slice (TensorRT-LLM's split: heads, KV heads
        duplicated below tp, MLP columns, vocab-padded lm_head rows) and ``tp_group`` sums the
        row-parallel outputs and gathers the vocab."""
        self.cfg, self.group, self.tp = cfg, tp_group, tp_size
        self.nh, self.d = int(cfg["num_attention_heads"]) // tp_size, int(cfg["head_size"])
        self.nkv = max(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]) // tp_size, 1)
        self.eps = float(cfg["norm_epsilon"])
        self.vocab = int(cfg["vocab_size"])
        self.max_batch, self.max_seq = max_batch, max_seq
        self.embed = weights["embed"]
        self.device, self.dtype = self.embed.device, self.embed.dtype
        quant = cfg.get("quantization") or {}
        self.kv_algo = quant.get("kv_cache_quant_algo") if quant.get("kv_cache_quant_algo") else None
        self.layers: list[LayerWeights] = []
        for i in range(int(cfg["num_hidden_layers"])):
            fields = []
            for f in LAYER_FIELDS:
                q = load_qlinear(weights, f"layers.{i}.{f}", quant) if (f in LINEAR_FIELDS and quant.get("quant_algo")) \
                    else None
                fields.append(q if q is not None else weights.get(f"layers.{i}.{f}"))
            self.layers.append(tuple(fields))
        if self.kv_algo and any(w[10] is None for w in self.layers):
            raise ValueError(f"kv_cache_quant_algo {self.kv_algo} but the engine lacks layers.*.kv_scale")
        self.final_norm = weights["final_norm"]
        self.head = weights["lm_head"][: self.vocab] if tp_size == 1 else weights["lm_head"]
        shape = (max_batch, self.nkv, max_seq, self.d)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        t = torch.arange(max_seq, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(cfg))
        self.cos, self.sin = freqs.cos().to(self.device), freqs.sin().to(self.device)
        self.slots = torch.arange(max_seq, device=self.device)
        self._decode_layer, self._prefill_layer, self._head = decode_layer, prefill_layer, lm_head
        self._decode_qkv, self._decode_out = decode_qkv, decode_out
        # CUDA: Triton decode attention (+ skinny GEMMs); the cuDNN/flash SDPA path elsewhere
        self.kernels = _cuda_kernels() if self.device.type == "cuda" else None
        if self.kernels is not None and not self.kernels.decode_attention_supported(self.d, self.dtype):
            self.kernels = None

    def compile(self, mode: str | None = None, options: dict | None = None) -> None:
        kw = compile_kwargs(mode, options)
        self._decode_layer = torch.compile(decode_layer, dynamic=False, **kw)
        self._decode_qkv = torch.compile(decode_qkv, dynamic=False, **kw)
        self._decode_out = torch.compile(decode_out, dynamic=False, **kw)
        self._head = torch.compile(lm_head, dynamic=False, **kw)
        self._prefill_layer = torch.compile(prefill_layer, dynamic=True, **kw)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, kv: int | None = None) -> torch.Tensor:
        """ids, pos [B] -> float32 logits [B, vocab]; writes K/V at pos. Attention reads only the
        first ``kv`` cache slots (every pos must be < kv), so short contexts do not pay for max_seq_len."""
        B = ids.shape[0]
        kv = kv or self.max_seq
        h = F.embedding(ids, self.embed)
        cos, sin = self.cos[pos], self.sin[pos]
        if self.kernels is not None:
            for i, w in enumerate(self.layers):
                q, k, v = self._decode_qkv(h, w, cos, sin, self.nh, self.nkv, self.d, self.eps, self.kv_algo)
                attn = self.kernels.decode_attention(q, k, v, self.k_cache[i], self.v_cache[i], pos, kv)
                h = self._decode_out(h, attn, w, self.eps, self.group)
            return self._gather_vocab(self._head(h, self.final_norm, self.head, self.eps))
        mask = decode_mask(self.slots, pos, kv, self.dtype)
        for i, w in enumerate(self.layers):
            h = self._decode_layer(h, w, self.k_cache[i][:B, :, :kv], self.v_cache[i][:B, :, :kv], pos, cos, sin,
                                   mask, self.nh, self.nkv, self.d, self.eps, self.group, self.kv_algo)
        return self._gather_vocab(self._head(h, self.final_norm, self.head, self.eps))

    def _gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_vocab(logits, self.group, self.vocab)

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, *, all_logits: bool = False,
                row0: int = 0) -> torch.Tensor:
        """ids [B, T] right-padded, lengths [B] -> float32 logits of each row's last token [B, vocab]
        (or of every token [B, T, vocab]); K/V go to cache rows [row0, row0 + B)."""
        B, T = ids.shape
        h = F.embedding(ids, self.embed)
        cos, sin = self.cos[:T], self.sin[:T]
        for i, w in enumerate(self.layers):
            h = self._prefill_layer(h, w, self.k_cache[i][row0:row0 + B], self.v_cache[i][row0:row0 + B], cos, sin,
                                    self.nh, self.nkv, self.d, self.eps, self.group, self.kv_algo)
        if not all_logits:
            h = h[torch.arange(B, device=h.device), lengths - 1]
        return self._gather_vocab(lm_head(h, self.final_norm, self.head, self.eps))  # eager: one matmul

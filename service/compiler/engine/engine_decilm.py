"""The Nemotron-NAS / DeciLM engine model: heterogeneous layers on the torch engine.

A DeciLM layer is a Llama layer whose attention and FFN may each be replaced by one H x H linear
layer (``x + W . rmsnorm(x)``, exactly as the reference) or removed (no tensors, not even
the norm, and no compute). Every real attention layer keeps its own KV-head count, and only those
layers get a static KV cache ``[max_batch, kv_heads_i, max_seq, d]``.

The Llama engine's hot path is untouched: a DeciLM model is a plan of residual *blocks*, each one
of three kinds, and each kind has one step function (compiled once, reused by every block of that
kind; attention graphs differ only per distinct KV-head count):

- ``attn``: rmsnorm -> fused qkv -> rope -> cached attention -> o, added to the residual;
- ``linear``: rmsnorm -> one linear, added to the residual (linear attention and linear FFN alike);
- ``mlp``: rmsnorm -> fused gate_up -> silu(fc) * gate -> down, added to the residual.

Engine layout (``kiln-decilm-fused/1``), per layer as present: ``attn_norm`` + ``qkv`` + ``o`` or
``attn_norm`` + ``attn_linear``; ``mlp_norm`` + ``gate_up`` + ``down`` or ``mlp_norm`` + ``ffn_linear``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models.nemotron_nas import ARCH, checkpoint_layers
from .engine_model import (
    apply_rope,
    compile_kwargs,
    decode_mask,
    lm_head,
    prefill_attention,
    rms_norm,
    rope_inv_freq,
)

DECILM_LAYOUT = "kiln-decilm-fused/1"
ATTN, LINEAR, MLP = "attn", "linear", "mlp"


def decilm_engine_table(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(engine tensor, checkpoint tensors concatenated along dim 0), global layer indices."""
    table: list[tuple[str, tuple[str, ...]]] = [("embed", ("transformer.vocab_embedding.weight",))]
    for i, layer in enumerate(checkpoint_layers(cfg)):
        p, e = f"transformer.layers.{i}.", f"layers.{i}."
        if layer.attention == "attention":
            table += [(e + "attn_norm", (p + "input_layernorm.weight",)), (e + "qkv", (p + "attention.qkv.weight",)),
                      (e + "o", (p + "attention.dense.weight",))]
        elif layer.attention == "linear":
            table += [(e + "attn_norm", (p + "input_layernorm.weight",)), (e + "attn_linear", (p + "attention.weight",))]
        if layer.ffn == "mlp":
            table += [(e + "mlp_norm", (p + "post_layernorm.weight",)),
                      (e + "gate_up", (p + "ffn.fc.weight", p + "ffn.gate.weight")),  # fc = silu branch, first
                      (e + "down", (p + "ffn.proj.weight",))]
        elif layer.ffn == "linear":
            table += [(e + "mlp_norm", (p + "post_layernorm.weight",)), (e + "ffn_linear", (p + "ffn.weight",))]
    table += [("final_norm", ("transformer.ln_f.weight",)), ("lm_head", ("lm_head.weight",))]
    return table


# -- step functions, one per block kind ---------------------------------------------------------

def linear_block(h: torch.Tensor, w: tuple, eps: float) -> torch.Tensor:
    """Linear attention or linear FFN: h + W . rmsnorm(h). Any leading shape."""
    return h + F.linear(rms_norm(h, w[0], eps), w[1])


def mlp_block(h: torch.Tensor, w: tuple, eps: float) -> torch.Tensor:
    a, u = F.linear(rms_norm(h, w[0], eps), w[1]).chunk(2, -1)
    return h + F.linear(F.silu(a) * u, w[2])


def decode_attn_block(h: torch.Tensor, w: tuple, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, nh: int, nkv: int, d: int,
                      eps: float) -> torch.Tensor:
    """One token per row. h [B, H]; caches [B, nkv, S, d]; pos [B]; cos/sin [B, d/2]; mask [B, 1, 1, S]."""
    B = h.shape[0]
    q, k, v = F.linear(rms_norm(h, w[0], eps), w[1]).split([nh * d, nkv * d, nkv * d], -1)
    q = apply_rope(q.view(B, nh, d), cos[:, None], sin[:, None])
    k = apply_rope(k.view(B, nkv, d), cos[:, None], sin[:, None])
    rows = torch.arange(B, device=h.device)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v.view(B, nkv, d)
    attn = F.scaled_dot_product_attention(q.view(B, nkv, nh // nkv, d), k_cache, v_cache, attn_mask=mask)
    return h + F.linear(attn.reshape(B, nh * d), w[2])


def prefill_attn_block(h: torch.Tensor, w: tuple, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, nh: int, nkv: int, d: int, eps: float) -> torch.Tensor:
    """A right-padded batch from position 0. h [B, T, H]; caches [B, nkv, S, d]; cos/sin [T, d/2]."""
    B, T, _ = h.shape
    q, k, v = F.linear(rms_norm(h, w[0], eps), w[1]).split([nh * d, nkv * d, nkv * d], -1)
    q = apply_rope(q.view(B, T, nh, d), cos[None, :, None], sin[None, :, None]).transpose(1, 2)
    k = apply_rope(k.view(B, T, nkv, d), cos[None, :, None], sin[None, :, None]).transpose(1, 2)
    v = v.view(B, T, nkv, d).transpose(1, 2)
    attn = prefill_attention(q, k, v, k_cache, v_cache)
    return h + F.linear(attn, w[2])


class DeciLMEngineModel:
    """Weights (DeciLM engine layout) + a static KV cache for the attention layers only; the same
    interface as ``EngineModel`` (decode / prefill / compile), so ``Engine`` batches, samples and
    captures CUDA graphs of it unchanged."""

    def __init__(self, cfg: dict, weights: dict[str, torch.Tensor], *, max_batch: int, max_seq: int,
                 tp_group=None, tp_size: int = 1):
        if cfg.get("architecture") != ARCH:
            raise ValueError(f"DeciLMEngineModel runs {ARCH}, not {cfg.get('architecture')!r}")
        if tp_size != 1 or tp_group is not None:
            raise ValueError("DeciLM engines run as one rank (tp checkpoints are merged at build time)")
        self.cfg, self.group, self.tp = cfg, None, 1
        self.nh, self.d = int(cfg["num_attention_heads"]), int(cfg["head_size"])
        self.eps = float(cfg["norm_epsilon"])
        self.vocab = int(cfg["vocab_size"])
        self.max_batch, self.max_seq = max_batch, max_seq
        self.embed = weights["embed"]
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.final_norm, self.head = weights["final_norm"], weights["lm_head"][: self.vocab]
        # the plan: (kind, weights, cache index or -1, kv heads); no_op parts are simply absent
        self.blocks: list[tuple[str, tuple, int, int]] = []
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.cache_layers: list[int] = []
        for i, layer in enumerate(checkpoint_layers(cfg)):
            g = f"layers.{i}."
            if layer.attention == "attention":
                nkv = int(layer.num_kv_heads)
                self.blocks.append((ATTN, (weights[g + "attn_norm"], weights[g + "qkv"], weights[g + "o"]),
                                    len(self.k_cache), nkv))
                shape = (max_batch, nkv, max_seq, self.d)
                self.k_cache.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
                self.v_cache.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
                self.cache_layers.append(i)
            elif layer.attention == "linear":
                self.blocks.append((LINEAR, (weights[g + "attn_norm"], weights[g + "attn_linear"]), -1, 0))
            if layer.ffn == "mlp":
                self.blocks.append((MLP, (weights[g + "mlp_norm"], weights[g + "gate_up"], weights[g + "down"]), -1, 0))
            elif layer.ffn == "linear":
                self.blocks.append((LINEAR, (weights[g + "mlp_norm"], weights[g + "ffn_linear"]), -1, 0))
        t = torch.arange(max_seq, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(cfg))
        self.cos, self.sin = freqs.cos().to(self.device), freqs.sin().to(self.device)
        self.slots = torch.arange(max_seq, device=self.device)
        self._decode: dict[str, Callable[..., torch.Tensor]] = {
            ATTN: decode_attn_block, LINEAR: linear_block, MLP: mlp_block}
        self._prefill: dict[str, Callable[..., torch.Tensor]] = {
            ATTN: prefill_attn_block, LINEAR: linear_block, MLP: mlp_block}
        self._head: Callable[..., torch.Tensor] = lm_head

    def compile(self, mode: str | None = None, options: dict | None = None) -> None:
        kw = compile_kwargs(mode, options)
        # decode graphs are static (one per batch / span bucket), prefill graphs dynamic; separate
        # wrappers keep the two kinds of graph for linear / mlp blocks apart
        self._decode = {k: torch.compile(f, dynamic=False, **kw) for k, f in
                        ((ATTN, decode_attn_block), (LINEAR, linear_block), (MLP, mlp_block))}
        self._prefill = {k: torch.compile(f, dynamic=True, **kw) for k, f in
                         ((ATTN, prefill_attn_block), (LINEAR, linear_block), (MLP, mlp_block))}
        self._head = torch.compile(lm_head, dynamic=False, **kw)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, kv: int | None = None) -> torch.Tensor:
        """ids, pos [B] -> float32 logits [B, vocab]; writes K/V at pos in the attention layers'
        caches, reading only their first ``kv`` slots."""
        B = ids.shape[0]
        kv = kv or self.max_seq
        h = F.embedding(ids, self.embed)
        cos, sin = self.cos[pos], self.sin[pos]
        mask = decode_mask(self.slots, pos, kv, self.dtype)
        attn, linear, mlp = self._decode[ATTN], self._decode[LINEAR], self._decode[MLP]
        for kind, w, c, nkv in self.blocks:
            if kind == MLP:
                h = mlp(h, w, self.eps)
            elif kind == LINEAR:
                h = linear(h, w, self.eps)
            else:
                h = attn(h, w, self.k_cache[c][:B, :, :kv], self.v_cache[c][:B, :, :kv], pos, cos, sin, mask,
                         self.nh, nkv, self.d, self.eps)
        return self._head(h, self.final_norm, self.head, self.eps)

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, *, all_logits: bool = False,
                row0: int = 0) -> torch.Tensor:
        """ids [B, T] right-padded, lengths [B] -> float32 logits of each row's last token [B, vocab]
        (or of every token [B, T, vocab]); K/V go to cache rows [row0, row0 + B)."""
        B, T = ids.shape
        h = F.embedding(ids, self.embed)
        cos, sin = self.cos[:T], self.sin[:T]
        attn, linear, mlp = self._prefill[ATTN], self._prefill[LINEAR], self._prefill[MLP]
        for kind, w, c, nkv in self.blocks:
            if kind == MLP:
                h = mlp(h, w, self.eps)
            elif kind == LINEAR:
                h = linear(h, w, self.eps)
            else:
                h = attn(h, w, self.k_cache[c][row0:row0 + B], self.v_cache[c][row0:row0 + B], cos, sin,
                         self.nh, nkv, self.d, self.eps)
        if not all_logits:
            h = h[torch.arange(B, device=h.device), lengths - 1]
        return lm_head(h, self.final_norm, self.head, self.eps)

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

"""Reference runtime for Nemotron-NAS / DeciLM checkpoints (heterogeneous layers), float32 on CPU.

Reads a TensorRT-LLM ``DeciLMForCausalLM`` checkpoint written by any TP x PP split (even or
Kiln's ``layers_per_stage``), merges the rank files back into whole per-layer weights and runs the
block semantics: attention / linear / no-op attention, mlp / linear / no-op FFN, each layer with
its own KV-head count and FFN width. Only real attention layers get a KV cache.

    from service.compiler.reference.decilm import DeciLMReference
    model = DeciLMReference.from_checkpoint("./ckpt")
    logits = model.forward(torch.tensor([[1, 2, 3]]))        # [batch, tokens, vocab] float32
    cache = model.new_cache()                                  # entries only for attention layers
    step = model.forward(ids[:, :2], cache); step = model.forward(ids[:, 2:], cache)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_config
from ..errors import InvalidCheckpoint
from ..mapping import Mapping
from ..models.nemotron_nas import ARCH, LayerConfig, checkpoint_layers
from ..safetensors_io import SafetensorsFile

KVCache = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (k, v) [batch, tokens, kv_heads, d]


def _merge_kv(parts: list[torch.Tensor], num_kv: int, tp: int) -> torch.Tensor:
    """Undo the KV split: with fewer KV heads than ranks each head sits on tp // num_kv ranks."""
    if num_kv >= tp:
        return torch.cat(parts, 0)
    return torch.cat(parts[:: tp // num_kv], 0)


def load_decilm_weights(ckpt_dir: str | os.PathLike) -> tuple[dict, list[LayerConfig], dict[str, torch.Tensor]]:
    """(config, layers, whole float32 weights keyed ``embed`` / ``layers.{i}.<name>`` / ``ln_f`` / ``lm_head``)."""
    ckpt_dir = Path(ckpt_dir)
    cfg = load_config(ckpt_dir)
    if cfg["architecture"] != ARCH:
        raise InvalidCheckpoint(f"{ckpt_dir} holds {cfg['architecture']!r}, not {ARCH}")
    layers = checkpoint_layers(cfg)
    m = Mapping.from_dict(cfg["mapping"])
    tp, nh, d = m.tp_size, cfg["num_attention_heads"], cfg["head_size"]
    files = {r: SafetensorsFile(ckpt_dir / f"rank{r}.safetensors") for r in m.ranks()}

    def get(rank: int, name: str) -> torch.Tensor:
        if name not in files[rank]:
            raise InvalidCheckpoint(f"rank{rank}.safetensors lacks {name}")
        return files[rank].tensor(name).to(torch.float32).clone()

    w: dict[str, torch.Tensor] = {}
    try:
        last = m.pp_size - 1
        w["embed"] = get(m.rank(0, 0), "transformer.vocab_embedding.weight")
        w["ln_f"] = get(m.rank(0, last), "transformer.ln_f.weight")
        head = torch.cat([get(m.rank(t, last), "lm_head.weight") for t in range(tp)], 0)
        w["lm_head"] = head[: cfg["vocab_size"]]  # drop the zero rows padding the vocab to a multiple of tp
        for s in range(m.pp_size):
            ranks = [m.rank(t, s) for t in range(tp)]
            for local, i in enumerate(m.pp_layers(cfg["num_hidden_layers"], s)):
                layer, p, g = layers[i], f"transformer.layers.{local}.", f"layers.{i}."

                def cat(name: str, dim: int) -> torch.Tensor:
                    return torch.cat([get(r, p + name) for r in ranks], dim)  # noqa: B023

                if layer.attention != "no_op":
                    w[g + "input_layernorm"] = get(ranks[0], p + "input_layernorm.weight")
                if layer.attention == "attention":
                    q_r, kv_r = nh // tp * d, max(layer.num_kv_heads // tp, 1) * d
                    parts = [get(r, p + "attention.qkv.weight") for r in ranks]
                    w[g + "q"] = torch.cat([t[:q_r] for t in parts], 0)
                    w[g + "k"] = _merge_kv([t[q_r:q_r + kv_r] for t in parts], layer.num_kv_heads, tp)
                    w[g + "v"] = _merge_kv([t[q_r + kv_r:] for t in parts], layer.num_kv_heads, tp)
                    w[g + "o"] = cat("attention.dense.weight", 1)
                elif layer.attention == "linear":
                    w[g + "attn_linear"] = cat("attention.weight", 0)
                if layer.ffn != "no_op":
                    w[g + "post_layernorm"] = get(ranks[0], p + "post_layernorm.weight")
                if layer.ffn == "mlp":
                    w[g + "fc"], w[g + "gate"] = cat("ffn.fc.weight", 0), cat("ffn.gate.weight", 0)
                    w[g + "proj"] = cat("ffn.proj.weight", 1)
                elif layer.ffn == "linear":
                    w[g + "ffn_linear"] = cat("ffn.weight", 0)
    finally:
        for f in files.values():
            f.close()
    return cfg, layers, w


def rope_inv_freq(cfg: dict) -> torch.Tensor:
    """GPT-NeoX rotary frequencies, with TensorRT-LLM's linear / llama3 scaling."""
    dim = cfg.get("rotary_embedding_dim") or cfg["head_size"]
    inv = 1.0 / (cfg.get("rotary_base", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    sc: dict = cfg.get("rotary_scaling") or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old / lo, inv / factor, torch.where(wavelen < old / hi, inv, mid))
    elif kind is not None:
        raise InvalidCheckpoint(f"rotary scaling {kind!r} is not supported by the reference runtime")
    return inv.to(torch.float32)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


class DeciLMReference:
    def __init__(self, cfg: dict, layers: list[LayerConfig], weights: dict[str, torch.Tensor]):
        self.cfg, self.layers, self.w = cfg, layers, weights
        self.inv_freq = rope_inv_freq(cfg)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | os.PathLike) -> DeciLMReference:
        return cls(*load_decilm_weights(ckpt_dir))

    @property
    def cache_layers(self) -> list[int]:
        """Layers that keep a KV cache: real attention only (no-op and linear attention keep none)."""
        return [i for i, layer in enumerate(self.layers) if layer.attention == "attention"]

    def new_cache(self) -> KVCache:
        return {}

    def _attention(self, i: int, h: torch.Tensor, pos0: int, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = h.shape
        nh, d, nkv = self.cfg["num_attention_heads"], self.cfg["head_size"], self.layers[i].num_kv_heads
        g = f"layers.{i}."
        q = (h @ self.w[g + "q"].T).view(b, t, nh, d)
        k = (h @ self.w[g + "k"].T).view(b, t, nkv, d)
        v = (h @ self.w[g + "v"].T).view(b, t, nkv, d)
        ang = torch.arange(pos0, pos0 + t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is not None:
            if i in cache:
                k, v = torch.cat([cache[i][0], k], 1), torch.cat([cache[i][1], v], 1)
            cache[i] = (k, v)
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=torch.ones(t, k.shape[1], dtype=torch.bool).tril(k.shape[1] - t),
        )
        return out.transpose(1, 2).reshape(b, t, nh * d) @ self.w[g + "o"].T

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [batch, tokens, vocab] (float32); ``ids`` is [tokens] or [batch, tokens]. With a
        ``cache`` the tokens continue the sequence it holds."""
        squeeze = ids.dim() == 1
        ids = ids[None] if squeeze else ids
        eps = self.cfg.get("norm_epsilon", 1e-5)
        pos0 = next(iter(cache.values()))[0].shape[1] if cache else 0
        x = self.w["embed"][ids]
        for i, layer in enumerate(self.layers):
            g = f"layers.{i}."
            if layer.attention != "no_op":
                h = _rms_norm(x, self.w[g + "input_layernorm"], eps)
                x = x + (self._attention(i, h, pos0, cache) if layer.attention == "attention"
                         else h @ self.w[g + "attn_linear"].T)
            if layer.ffn != "no_op":
                h = _rms_norm(x, self.w[g + "post_layernorm"], eps)
                if layer.ffn == "mlp":
                    h = (F.silu(h @ self.w[g + "fc"].T) * (h @ self.w[g + "gate"].T)) @ self.w[g + "proj"].T
                else:
                    h = h @ self.w[g + "ffn_linear"].T
                x = x + h
        logits = _rms_norm(x, self.w["ln_f"], eps) @ self.w["lm_head"].T
        return logits[0] if squeeze else logits

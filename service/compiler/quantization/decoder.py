"""One decoder layer at a time, on TensorRT-LLM checkpoint tensors (Llama/Mistral/Qwen2/Qwen3, GPT-2, OPT).

The quantizer's calibration and its accuracy report run the model layer by layer with this; every
linear goes through a caller-supplied ``linear(module, x)`` (float, hooked for statistics, or the
``qlinear`` dequantize-on-the-fly path) and K/V through an optional ``kv(k, v)`` (KV-cache quantization).

    dec = Decoder(config)
    h = dec.embed(tensors, ids)                                  # [B, L, H] float32
    h = dec.layer(layer_tensors, h, linear=dec.float_linear(layer_tensors))
    logits = dec.head(tensors, h)

``layer_tensors`` use layer-local names (``attention.qkv.weight``...). Math in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import UnsupportedArchitecture

LinearFn = Callable[[str, torch.Tensor], torch.Tensor]
KVFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")  # Qwen3: q/k norms
GPT_ARCHS = ("GPTForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM")


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    acts: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
    return acts[name]


def rope_inv_freq(d: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    pos_div = 1.0
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind == "linear":
        pos_div = float(scaling["factor"])  # type: ignore[index]
    elif kind == "llama3":
        assert scaling is not None
        f, lo, hi = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, mid, scaled)
    return inv.float(), pos_div


class Decoder:
    def __init__(self, config: dict):
        self.cfg = config
        arch = config["architecture"]
        if arch not in LLAMA_ARCHS + GPT_ARCHS:
            raise UnsupportedArchitecture(f"the quantizer's layer runner does not support {arch!r}",
                                          hint=f"supported: {', '.join(LLAMA_ARCHS + GPT_ARCHS)}")
        self.llama = arch in LLAMA_ARCHS
        self.nh = config["num_attention_heads"]
        self.nkv = config.get("num_key_value_heads") or self.nh
        self.d = config.get("head_size") or config["hidden_size"] // self.nh
        self.eps = float(config.get("norm_epsilon", 1e-5))
        self.act = _act(config.get("hidden_act", "silu"))
        self.pre_ln = bool(config.get("do_layer_norm_before", True))
        self.vocab = config["vocab_size"]
        if self.llama:
            self.inv_freq, self.pos_div = rope_inv_freq(self.d, float(config.get("rotary_base", 10000.0)),
                                                        config.get("rotary_scaling"))

    # -- pieces -----------------------------------------------------------------------------------
    def norm(self, t: dict, name: str, x: torch.Tensor) -> torch.Tensor:
        w = t[name + ".weight"].float()
        if self.llama:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w
        return F.layer_norm(x, (x.shape[-1],), w, t[name + ".bias"].float(), self.eps)

    def float_linear(self, t: dict) -> LinearFn:
        def linear(module: str, x: torch.Tensor) -> torch.Tensor:
            y = x @ t[module + ".weight"].float().t()
            b = t.get(module + ".bias")
            return y if b is None else y + b.float()
        return linear

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[2]
        pos = torch.arange(L, dtype=torch.float32, device=x.device) / self.pos_div
        ang = pos[:, None] * self.inv_freq.to(x.device)[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def attention(self, t: dict, x: torch.Tensor, linear: LinearFn, kv: KVFn | None) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = linear("attention.qkv", x)
        q, k, v = qkv.split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q = q.reshape(B, L, self.nh, self.d).transpose(1, 2)
        k = k.reshape(B, L, self.nkv, self.d).transpose(1, 2)
        v = v.reshape(B, L, self.nkv, self.d).transpose(1, 2)
        if "attention.q_layernorm.weight" in t:  # Qwen3: RMSNorm of each head's q and k, before rope
            q, k = self.norm(t, "attention.q_layernorm", q), self.norm(t, "attention.k_layernorm", k)
        if self.llama:
            q, k = self._rope(q), self._rope(k)
        if kv is not None:
            k, v = kv(k, v)
        if self.nkv != self.nh:
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return linear("attention.dense", o.transpose(1, 2).reshape(B, L, self.nh * self.d))

    def mlp(self, t: dict, x: torch.Tensor, linear: LinearFn) -> torch.Tensor:
        if "mlp.gate.weight" in t or any(k.startswith("mlp.gate.") for k in t):
            return linear("mlp.proj", self.act(linear("mlp.fc", x)) * linear("mlp.gate", x))
        return linear("mlp.proj", self.act(linear("mlp.fc", x)))

    # -- the model ---------------------------------------------------------------------------------
    def embed(self, t: dict, ids: torch.Tensor) -> torch.Tensor:
        h = t["transformer.vocab_embedding.weight"].float()[ids.to(t["transformer.vocab_embedding.weight"].device)]
        if not self.llama:
            h = h + t["transformer.position_embedding.weight"].float()[: ids.shape[-1]][None]
        return h

    def layer(self, t: dict, h: torch.Tensor, linear: LinearFn | None = None, kv: KVFn | None = None) -> torch.Tensor:
        linear = linear or self.float_linear(t)
        if self.pre_ln:
            h = h + self.attention(t, self.norm(t, "input_layernorm", h), linear, kv)
            return h + self.mlp(t, self.norm(t, "post_layernorm", h), linear)
        h = self.norm(t, "input_layernorm", h + self.attention(t, h, linear, kv))  # OPT post-LN
        return self.norm(t, "post_layernorm", h + self.mlp(t, h, linear))

    def head(self, t: dict, h: torch.Tensor) -> torch.Tensor:
        if "transformer.ln_f.weight" in t:
            h = self.norm(t, "transformer.ln_f", h)
        w = t.get("lm_head.weight")
        if w is None:
            w = t["transformer.vocab_embedding.weight"]
        return (h @ w.float().t())[..., : self.vocab]


def layer_index(name: str) -> int | None:
    """``transformer.layers.7.x`` -> 7."""
    if not name.startswith("transformer.layers."):
        return None
    return int(name.split(".", 3)[2])


def local_name(name: str) -> str:
    return name.split(".", 3)[3]

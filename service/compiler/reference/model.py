"""Kiln's reference runtime: plain PyTorch over a TensorRT-LLM checkpoint, the numerical oracle.

``ReferenceModel.from_checkpoint(dir)`` merges any TP x PP split back into whole weights
(``checkpoint_loader.load_checkpoint_weights``) and runs them eagerly, with no transformers modeling
code and no compilation, matching Hugging Face numerics:

* Llama family (Llama, Mistral, Qwen2): RMSNorm (float32 inside), GPT-NeoX rotary over the whole
  head (float32 tables; linear and llama3 scaling), GQA, ``proj(silu(fc(x)) * gate(x))``.
* GPT-2: pre-LN LayerNorm, learned positions, biases everywhere, ``proj(act(fc(x)))``.
* OPT: as GPT-2 with ``do_layer_norm_before`` true; post-LN (``x = ln1(x + attn(x))``,
  ``x = ln2(x + mlp(x))``, no ``ln_f``) when false. Position p uses row p of the table.
* DeciLM / Nemotron-NAS checkpoints are delegated to ``reference.decilm`` (float32, CPU).

    m = ReferenceModel.from_checkpoint("./ckpt")              # compute_dtype=torch.float32 upcasts
    logits = m.forward(torch.tensor([[1, 2, 3]]))             # [B, T, vocab_size] float32, causal
    cache = m.new_cache(); m.forward(ids[:, :5], cache); m.forward(ids[:, 5:], cache)  # incremental
    new = m.generate([1, 2, 3], max_new_tokens=8, eos_token_id=2)  # greedy, KV cache, new tokens only
    ppl = m.perplexity(ids, window=512)                        # exp(mean NLL), non-overlapping windows
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument, InvalidCheckpoint
from ..quantization.qlinear import keeps_stored_dtype, qdq_kv_cache, qlinear
from .checkpoint_loader import TORCH_DTYPES, check_complete, family, load_checkpoint_weights, read_config

DECILM = "DeciLMForCausalLM"

_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,  # exact erf form, as HF's "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rope_inv_freq(cfg: dict) -> torch.Tensor:
    """float32 inverse frequencies of GPT-NeoX rotary over ``head_size``, with HF's scaling rules."""
    d = int(cfg["head_size"])
    base = float(cfg.get("rotary_base") or 10000.0)
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))
    sc = cfg.get("rotary_scaling")
    if sc is None:
        return inv
    if not isinstance(sc, dict):
        raise InvalidCheckpoint(f"config.json: rotary_scaling must be an object or null, got {sc!r}")
    kind = sc.get("rope_type", sc.get("type"))
    try:
        if kind in (None, "default"):
            return inv
        if kind == "linear":
            return inv / float(sc["factor"])
        if kind == "llama3":
            factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
            old = float(sc["original_max_position_embeddings"])
    except KeyError as exc:
        raise InvalidCheckpoint(f"config.json: rotary_scaling {kind!r} lacks {exc.args[0]!r}") from exc
    if kind != "llama3":
        raise InvalidCheckpoint(
            f"config.json: rotary_scaling type {kind!r} is not supported by the reference runtime",
            hint="supported: linear, llama3",
        )
    # transformers' _compute_llama3_parameters, step for step.
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Per-layer keys/values [B, kv_heads, S, head_size] and the number of positions they hold."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0


def _as_ids(ids: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    """[B, T] int64 on the CPU; a list or a 1-D tensor is a batch of one."""
    if isinstance(ids, torch.Tensor):
        t = ids
    else:
        try:
            t = torch.tensor(list(ids), dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidArgument(f"{what} must be a list of ints or a LongTensor: {exc}") from exc
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InvalidArgument(f"{what} must hold integer token ids, got dtype {t.dtype}")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise InvalidArgument(f"{what} must be [batch, tokens], got shape {list(t.shape)}")
    return t.long()


class ReferenceModel:
    """A checkpoint's merged weights and an eager forward pass; see the module docstring.

    ``ReferenceModel(config, weights)`` takes already merged weights (``load_checkpoint_weights``
    names and layout), e.g. dequantized ones; ``from_checkpoint`` reads a checkpoint directory.
    """

    def __init__(self, config: dict, weights: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 compute_dtype: torch.dtype | None = None):
        self.config = config
        self.family = family(config)
        q = config.get("quantization") or {}
        # Quantized checkpoints execute from their low-precision tensors (service/compiler/quantization/qlinear.py).
        self.quant = q if q.get("quant_algo") or q.get("kv_cache_quant_algo") else None
        if self.quant is None:
            check_complete(config, weights)
        if compute_dtype is None:
            compute_dtype = TORCH_DTYPES[config["dtype"]]
        if compute_dtype not in TORCH_DTYPES.values():
            raise InvalidArgument(f"compute_dtype must be torch.float32, float16 or bfloat16, got {compute_dtype!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InvalidArgument(f"invalid device {device!r}: {exc}") from exc
        self.dtype = compute_dtype
        self.w = {k: v.to(device=self.device) if self.quant is not None and keeps_stored_dtype(k, v)
                  else v.to(device=self.device, dtype=compute_dtype) for k, v in weights.items()}
        c = config
        self.num_layers = int(c["num_hidden_layers"])
        self.num_heads = int(c["num_attention_heads"])
        self.num_kv = int(c.get("num_key_value_heads") or self.num_heads)
        self.head_size = int(c.get("head_size") or int(c["hidden_size"]) // self.num_heads)
        self.vocab_size = int(c["vocab_size"])
        self.eps = float(c.get("norm_epsilon") or 1e-5)
        act = c.get("hidden_act", "silu" if self.family == "llama" else "gelu_new")
        if act not in _ACTS:
            raise InvalidCheckpoint(f"config.json: hidden_act {act!r} is not supported (supported: {', '.join(_ACTS)})")
        self.act: Callable[[torch.Tensor], torch.Tensor] = _ACTS[act]
        self.post_ln = self.family == "opt" and not c.get("do_layer_norm_before", True)
        self.rope = self.family == "llama"
        if self.rope and c.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox":
            raise InvalidCheckpoint(
                f"config.json: position_embedding_type {c.get('position_embedding_type')!r} is not supported "
                f"for {c['architecture']} (expected rope_gpt_neox)"
            )
        if self.family != "llama" and c.get("position_embedding_type", "learned_absolute") != "learned_absolute":
            raise InvalidCheckpoint(f"config.json: {c['architecture']} needs learned_absolute positions")
        if self.family == "llama":
            for flag in ("qk_layernorm", "residual_mlp", "use_sliding_window"):
                if c.get(flag):
                    raise InvalidCheckpoint(f"config.json: {flag}=true is not supported by the reference runtime")
            if self.head_size % 2:
                raise InvalidCheckpoint(f"config.json: rotary needs an even head_size, got {self.head_size}")
            self.inv_freq = rope_inv_freq({**c, "head_size": self.head_size}).to(self.device)
        self.max_pos = int(c.get("max_position_embeddings") or 0) if not self.rope else None

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu",
                        compute_dtype: torch.dtype | None = None) -> ReferenceModel:
        if read_config(ckpt_dir).get("architecture") == DECILM:
            return _DeciLMModel(ckpt_dir, device, compute_dtype)
        config, weights = load_checkpoint_weights(ckpt_dir)
        return cls(config, weights, device=device, compute_dtype=compute_dtype)

    # -- building blocks -------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.w[name + ".weight"]
        if self.family == "llama":  # HF LlamaRMSNorm: float32 statistics, cast back, then scale
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return w * h.to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), w, self.w[name + ".bias"], self.eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.quant is not None:
            return qlinear(x, self.w, name, self.quant).to(x.dtype)
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + _rotate_half(x) * sin

    def _attention(self, i: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                   cache: KVCache | None) -> torch.Tensor:
        b, t, _ = h.shape
        nh, nkv, d = self.num_heads, self.num_kv, self.head_size
        p = f"transformer.layers.{i}.attention."
        q, k, v = self._linear(h, p + "qkv").split([nh * d, nkv * d, nkv * d], dim=-1)
        q = q.view(b, t, nh, d).transpose(1, 2)
        k = k.view(b, t, nkv, d).transpose(1, 2)
        v = v.view(b, t, nkv, d).transpose(1, 2)
        if rope is not None:
            q, k = self._rope(q, *rope), self._rope(k, *rope)
        if self.quant is not None and self.quant.get("kv_cache_quant_algo"):  # what the quantized cache returns
            k, v = (t.to(q.dtype) for t in qdq_kv_cache(k, v, self.w, f"transformer.layers.{i}", self.quant))
        if cache is not None:
            prev_k, prev_v = cache.k[i], cache.v[i]
            if prev_k is not None and prev_v is not None:
                k, v = torch.cat([prev_k, k], 2), torch.cat([prev_v, v], 2)
            cache.k[i], cache.v[i] = k, v
        if nkv != nh:
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        s = k.shape[2]
        mask, causal = None, False
        if t == s:
            causal = t > 1
        elif t > 1:  # new tokens continuing a cached prefix: row j sees keys up to s - t + j
            mask = torch.ones(t, s, dtype=torch.bool, device=h.device).tril(s - t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0 / math.sqrt(d))
        return self._linear(out.transpose(1, 2).reshape(b, t, nh * d), p + "dense")

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        p = f"transformer.layers.{i}.mlp."
        a = self.act(self._linear(h, p + "fc"))
        if self.family == "llama":
            a = a * self._linear(h, p + "gate")
        return self._linear(a, p + "proj")

    def _run(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """float32 logits [B, T, vocab] of ``ids`` [B, T] (CPU int64), continuing ``cache`` if given."""
        b, t = ids.shape
        if t == 0:
            raise InvalidArgument("input_ids holds no tokens")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise InvalidArgument(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.vocab_size})")
        pos0 = cache.length if cache is not None else 0
        if self.max_pos is not None and pos0 + t > self.max_pos:
            raise InvalidArgument(
                f"{pos0 + t} positions exceed max_position_embeddings={self.max_pos} of this "
                f"{self.config['architecture']} checkpoint (learned positions)"
            )
        ids = ids.to(self.device)
        x = F.embedding(ids, self.w["transformer.vocab_embedding.weight"])
        rope = None
        if self.rope:
            pos = torch.arange(pos0, pos0 + t, device=self.device, dtype=torch.float32)
            ang = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat([ang, ang], -1)
            rope = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        else:
            x = x + self.w["transformer.position_embedding.weight"][pos0:pos0 + t]
        for i in range(self.num_layers):
            p = f"transformer.layers.{i}."
            if self.post_ln:
                x = self._norm(x + self._attention(i, x, rope, cache), p + "input_layernorm")
                x = self._norm(x + self._mlp(i, x), p + "post_layernorm")
            else:
                x = x + self._attention(i, self._norm(x, p + "input_layernorm"), rope, cache)
                x = x + self._mlp(i, self._norm(x, p + "post_layernorm"))
        if cache is not None:
            cache.length += t
        if not self.post_ln:
            x = self._norm(x, "transformer.ln_f")
        return F.linear(x, self.w["lm_head.weight"]).float()

    # -- public API ------------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        """An empty KV cache for ``forward(ids, cache)`` (one sequence batch, grown in place)."""
        return KVCache(self.num_layers)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | Sequence[int], cache: KVCache | None = None) -> torch.Tensor:
        """float32 logits [B, T, vocab_size] (unpadded vocab), causal.

        Without ``cache`` (the default) the tokens start at position 0 and nothing is kept. With a
        cache from ``new_cache()`` they continue the sequence it holds, and it grows by them. A list
        or 1-D tensor is a batch of one ([1, T, vocab_size] comes back).
        """
        return self._run(_as_ids(input_ids, "input_ids"), cache)

    __call__ = forward

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int,
                 eos_token_id: int | Iterable[int] | None = None) -> list[int]:
        """Greedy decoding with a KV cache; returns the new tokens only (an EOS token included)."""
        ids = _as_ids(input_ids, "input_ids")
        if ids.shape[0] != 1:
            raise InvalidArgument(f"generate takes one sequence, got a batch of {ids.shape[0]}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InvalidArgument(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if eos_token_id is None:
            eos: set[int] = set()
        elif isinstance(eos_token_id, int):
            eos = {eos_token_id}
        else:
            eos = {int(e) for e in eos_token_id}
        out: list[int] = []
        if max_new_tokens == 0:
            return out
        cache = self.new_cache()
        logits = self._run(ids, cache)
        while True:
            nxt = int(torch.argmax(logits[0, -1]))
            out.append(nxt)
            if nxt in eos or len(out) >= max_new_tokens:
                return out
            logits = self._run(torch.tensor([[nxt]], dtype=torch.long), cache)

    @torch.inference_mode()
    def perplexity(self, token_ids: torch.Tensor | Sequence[int], window: int = 512) -> float:
        """exp of the mean next-token NLL over non-overlapping windows of ``window`` tokens.

        GPTQ protocol: each window is scored on its own (tokens 1..L-1 given their prefix in the
        window); the mean runs over every scored token of every window, so full windows weigh
        equally and a last partial window (kept if it has >= 2 tokens) weighs by its length.
        """
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise InvalidArgument(f"window must be an integer >= 2, got {window!r}")
        ids = _as_ids(token_ids, "token_ids")
        if ids.shape[0] != 1:
            raise InvalidArgument(f"perplexity takes one token sequence, got a batch of {ids.shape[0]}")
        ids = ids[0]
        if ids.numel() < 2:
            raise InvalidArgument(f"perplexity needs at least 2 tokens, got {ids.numel()}")
        total, count = 0.0, 0
        for start in range(0, ids.numel(), window):
            chunk = ids[start:start + window]
            if chunk.numel() < 2:
                break
            logits = self._run(chunk[None], None)[0, :-1]
            nll = F.cross_entropy(logits, chunk[1:].to(logits.device), reduction="sum")
            total += float(nll.double())
            count += chunk.numel() - 1
        return math.exp(total / count)


class _DeciLMModel(ReferenceModel):
    """DeciLM / Nemotron-NAS checkpoints (heterogeneous layers) through ``reference.decilm``."""

    def __init__(self, ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 compute_dtype: torch.dtype | None = None):
        from .decilm import DeciLMReference

        if torch.device(device).type != "cpu" or compute_dtype not in (None, torch.float32):
            raise InvalidArgument("DeciLM checkpoints run on the CPU in float32 only in the reference runtime")
        self.core = DeciLMReference.from_checkpoint(ckpt_dir)
        self.config = self.core.cfg
        self.family, self.device, self.dtype = "decilm", torch.device("cpu"), torch.float32
        self.vocab_size = int(self.config["vocab_size"])
        self.w = self.core.w

    def new_cache(self) -> dict:  # type: ignore[override]
        return self.core.new_cache()

    def _run(self, ids: torch.Tensor, cache: dict | None) -> torch.Tensor:  # type: ignore[override]
        if ids.shape[1] == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise InvalidArgument(f"token ids must be non-empty and inside the vocabulary [0, {self.vocab_size})")
        return self.core.forward(ids, cache).float()


__all__ = ["KVCache", "ReferenceModel", "rope_inv_freq"]

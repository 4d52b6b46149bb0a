"""Kiln's reference runtime: plain PyTorch over a TensorRT-LLM checkpoint, the numerical oracle.

``ReferenceModel.from_checkpoint(dir)`` merges any TP x PP split back into whole weights
(``checkpoint_loader.load_checkpoint_weights``) and runs them eagerly, with no transformers modeling
code and no compilation, matching Hugging Face numerics. It executes the checkpoint's ``ModelSpec``
(``models/spec.py``, declared per family by ``block_specs``), block by block, over the checkpoint's
own tensor names; the torch engine executes the same spec:

* norms: RMSNorm (float32 statistics, cast back, then scaled: HF Llama), RMSNorm with a (1 + w)
  scale in float32 (Gemma), LayerNorm with bias; placed before each part (pre), after each residual
  add (OPT post-LN) or before and after each part (sandwich);
* attention: full or sliding-window causal attention with GQA, GPT-NeoX rotary over the first
  ``rope.dim`` dims (float32 tables; linear and llama3 scaling) or none (learned positions), optional
  per-head q/k norm, logit soft-cap and scale; or one linear layer; or nothing;
* MLP: ``proj(act(fc(x)) * gate(x))`` (gated), ``proj(act(fc(x)))`` (plain), one linear, or nothing;
  or a Mixture of Experts as transformers routes it: softmax of the router logits in float32, top-k,
  optionally renormalized, each hit expert run on its tokens and added with its weight, plus a shared
  expert scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE);
* embedding scale, learned absolute positions (row p = position p), final norm, final logit soft-cap.

    m = ReferenceModel.from_checkpoint("./ckpt")              # compute_dtype=torch.float32 upcasts
    logits = m.forward(torch.tensor([[1, 2, 3]]))             # [B, T, vocab] float32, causal
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

from ..errors import InvalidArgument, InvalidCheckpoint, UnsupportedArchitecture
from ..models import block_specs
from ..models.phi3 import longrope_tables
from ..models.spec import Block, ModelSpec, Norm, Rope
from ..quantization.qlinear import keeps_stored_dtype, qdq_kv_cache, qlinear
from .checkpoint_loader import TORCH_DTYPES, check_complete, family, load_checkpoint_weights

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact erf form, as HF's "gelu"
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # gelu_new / gelu_pytorch_tanh / gelu_fast
    "relu": F.relu,
    "swiglu": lambda x: F.silu(x.chunk(2, -1)[1]) * x.chunk(2, -1)[0],  # TensorRT-LLM's fused [up; gate] fc
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


def _is_longrope(rope: Rope) -> bool:
    return (rope.scaling_dict or {}).get("rope_type") == "longrope"


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
    """A checkpoint's merged weights and an eager forward pass of its ModelSpec; see the module docstring.

    ``ReferenceModel(config, weights)`` takes already merged weights (``load_checkpoint_weights``
    names and layout), e.g. dequantized ones; ``from_checkpoint`` reads a checkpoint directory.
    """

    def __init__(self, config: dict, weights: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 compute_dtype: torch.dtype | None = None, spec: ModelSpec | None = None):
        self.config = config
        try:
            self.family = family(config)
        except UnsupportedArchitecture:
            if spec is None:
                raise
            self.family = "custom"  # a given spec runs as it is (a family the converter does not know yet)
        self.spec = (spec or block_specs(config)).check("the reference runtime")
        q = config.get("quantization") or {}
        # Quantized checkpoints execute from their low-precision tensors (service/compiler/quantization/qlinear.py).
        self.quant = q if q.get("quant_algo") or q.get("kv_cache_quant_algo") else None
        if self.quant is None and self.family in ("llama", "gpt", "opt", "phi3") and spec is None:
            check_complete(config, weights)  # the uniform families' tensor rules (from_checkpoint's loader checked)
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
        self.num_layers = len(self.spec.blocks)
        self.vocab_size = self.spec.vocab_size
        self.max_pos = self.spec.learned_positions or None
        self.inv_freq: dict[Rope, torch.Tensor] = {}
        # longrope: generate() recomputes the cache when the sequence first passes the original length
        self._recompute_at = next((int((b.attention.rope.scaling_dict or {})["original_max_position_embeddings"])
                                   for b in self.spec.blocks if b.attention.rope is not None
                                   and _is_longrope(b.attention.rope)), None)
        self._tables: tuple = (None, None)
        for b in self.spec.blocks:
            rope = b.attention.rope
            if rope is not None and rope not in self.inv_freq and not _is_longrope(rope):
                cfg = {"head_size": rope.dim, "rotary_base": rope.base, "rotary_scaling": rope.scaling_dict}
                self.inv_freq[rope] = rope_inv_freq(cfg).to(self.device)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu",
                        compute_dtype: torch.dtype | None = None) -> ReferenceModel:
        config, weights = load_checkpoint_weights(ckpt_dir)
        try:
            spec = block_specs(config).check("the reference runtime")
        except UnsupportedArchitecture as exc:
            raise InvalidCheckpoint(f"config.json: {exc.args[0]}", hint=getattr(exc, "hint", None)) from exc
        return cls(config, weights, device=device, compute_dtype=compute_dtype, spec=spec)

    # -- building blocks -------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, name: str, norm: Norm) -> torch.Tensor:
        w = self.w[name + ".weight"]
        if norm.kind == "rms":  # HF LlamaRMSNorm: float32 statistics, cast back, then scale
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
            return w * h.to(x.dtype)
        if norm.kind == "rms_1p":  # HF GemmaRMSNorm: all in float32, (1 + w), cast back
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
            return (h * (1.0 + w.float())).to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), w, self.w.get(name + ".bias"), norm.eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.quant is not None:
            return qlinear(x, self.w, name, self.quant).to(x.dtype)
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dim = cos.shape[-1]
        if dim == x.shape[-1]:
            return x * cos + _rotate_half(x) * sin
        x, rest = x[..., :dim], x[..., dim:]  # partial rotary: the first dim dims turn
        return torch.cat([x * cos + _rotate_half(x) * sin, rest], -1)

    def _rope_table(self, rope: Rope, pos0: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [t, dim] of positions [pos0, pos0 + t), in the compute dtype (once per forward)."""
        key = (rope, pos0, t)
        if self._tables[0] != key and _is_longrope(rope):
            # transformers: one factor set per forward, the long one once it reaches past the original length
            long = pos0 + t > int((rope.scaling_dict or {})["original_max_position_embeddings"])
            cos, sin = longrope_tables(rope, pos0 + t, long=long)
            emb_cos, emb_sin = (torch.cat([x, x], -1)[pos0:].to(self.device, self.dtype) for x in (cos, sin))
            self._tables = (key, (emb_cos, emb_sin))
        if self._tables[0] != key:
            pos = torch.arange(pos0, pos0 + t, device=self.device, dtype=torch.float32)
            ang = pos[:, None] * self.inv_freq[rope][None, :]
            emb = torch.cat([ang, ang], -1)
            self._tables = (key, (emb.cos().to(self.dtype), emb.sin().to(self.dtype)))
        return self._tables[1]

    def _attention(self, i: int, blk: Block, h: torch.Tensor, pos0: int, cache: KVCache | None) -> torch.Tensor:
        a = blk.attention
        p = f"transformer.layers.{i}.attention"
        if a.kind == "linear":
            return self._linear(h, p)
        b, t, _ = h.shape
        nh, nkv, d = a.num_heads, a.num_kv_heads, a.head_size
        q, k, v = self._linear(h, p + ".qkv").split([nh * d, nkv * d, nkv * d], dim=-1)
        q = q.view(b, t, nh, d).transpose(1, 2)
        k = k.view(b, t, nkv, d).transpose(1, 2)
        v = v.view(b, t, nkv, d).transpose(1, 2)
        if a.qk_norm is not None:
            q, k = self._norm(q, p + ".q_layernorm", a.qk_norm), self._norm(k, p + ".k_layernorm", a.qk_norm)
        if a.rope is not None:
            cos, sin = self._rope_table(a.rope, pos0, t)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
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
        scale = a.scale if a.scale is not None else 1.0 / math.sqrt(d)
        if a.kind == "full" and a.softcap is None:
            mask, causal = None, False
            if t == s:
                causal = t > 1
            elif t > 1:  # new tokens continuing a cached prefix: row j sees keys up to s - t + j
                mask = torch.ones(t, s, dtype=torch.bool, device=h.device).tril(s - t)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        else:  # the scores spelled out: soft-cap and / or a sliding window
            seen = torch.ones(t, s, dtype=torch.bool, device=h.device).tril(s - t)
            if a.kind == "sliding":  # query at s - t + j sees keys (s - t + j - window, s - t + j]
                seen &= ~torch.ones(t, s, dtype=torch.bool, device=h.device).tril(s - t - a.window)
            scores = (q.float() @ k.float().transpose(-1, -2)) * scale
            if a.softcap is not None:
                scores = a.softcap * torch.tanh(scores / a.softcap)
            probs = scores.masked_fill(~seen, float("-inf")).softmax(-1).to(v.dtype)
            out = probs @ v
        return self._linear(out.transpose(1, 2).reshape(b, t, nh * d), p + ".dense")

    def route(self, i: int, blk: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] in x's dtype, expert ids [N, k]) of tokens x [N, H] at layer i."""
        m = blk.mlp
        logits = F.linear(x, self.w[f"transformer.layers.{i}.{blk.mlp_module}.router.weight"])
        top, idx = torch.topk(torch.softmax(logits.float(), -1), m.top_k, dim=-1)
        if m.renormalize:
            top = top / top.sum(-1, keepdim=True)
        return top.to(x.dtype), idx

    def _moe(self, i: int, blk: Block, h: torch.Tensor) -> torch.Tensor:
        p = f"transformer.layers.{i}.{blk.mlp_module}"
        x = h.reshape(-1, h.shape[-1])
        weights, idx = self.route(i, blk, x)
        fc, proj = self.w[p + ".fc.weight"], self.w[p + ".proj.weight"]
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():  # each hit expert on its tokens
            tok, slot = torch.where(idx == e)
            up, gate = F.linear(x[tok], fc[e]).chunk(2, -1)  # each expert's rows: [up; gate]
            y = F.linear(F.silu(gate) * up, proj[e])
            out.index_add_(0, tok, y * weights[tok, slot, None])
        if blk.mlp.shared_size:
            up, gate = F.linear(x, self.w[p + ".shared_expert.fc.weight"]).chunk(2, -1)
            shared = F.linear(F.silu(gate) * up, self.w[p + ".shared_expert.proj.weight"])
            out = out + torch.sigmoid(F.linear(x, self.w[p + ".shared_expert_gate.weight"])) * shared
        return out.view(h.shape)

    def _mlp(self, i: int, blk: Block, h: torch.Tensor) -> torch.Tensor:
        m, p = blk.mlp, f"transformer.layers.{i}.{blk.mlp_module}"
        if m.kind == "moe":
            return self._moe(i, blk, h)
        if m.kind == "linear":
            return self._linear(h, p)
        a = ACTIVATIONS[m.act](self._linear(h, p + ".fc"))
        if m.kind == "gated":
            a = a * self._linear(h, p + ".gate")
        return self._linear(a, p + ".proj")

    def _block(self, i: int, blk: Block, x: torch.Tensor, pos0: int, cache: KVCache | None) -> torch.Tensor:
        p = f"transformer.layers.{i}."
        pre_attn, pre_mlp, post_attn, post_mlp = (p + n for n in blk.norm_names)
        parts = ((blk.attention.kind != "none", lambda y: self._attention(i, blk, y, pos0, cache), pre_attn, post_attn),
                 (blk.mlp.kind != "none", lambda y: self._mlp(i, blk, y), pre_mlp, post_mlp))
        for present, part, pre, post in parts:
            if not present:
                continue
            if blk.placement == "post":  # OPT post-LN: the norm after the residual add
                x = self._norm(x + part(x), pre, blk.norm)
                continue
            y = part(self._norm(x, pre, blk.norm))
            if blk.placement == "sandwich":
                y = self._norm(y, post, blk.norm)
            x = x + y
        return x

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
        spec = self.spec
        ids = ids.to(self.device)
        x = F.embedding(ids, self.w["transformer.vocab_embedding.weight"])
        if spec.embedding_scale is not None:
            x = x * torch.tensor(spec.embedding_scale, dtype=x.dtype)
        if spec.learned_positions:
            x = x + self.w["transformer.position_embedding.weight"][pos0:pos0 + t]
        for i, blk in enumerate(spec.blocks):
            x = self._block(i, blk, x, pos0, cache)
        if cache is not None:
            cache.length += t
        if spec.final_norm is not None:
            x = self._norm(x, "transformer.ln_f", spec.final_norm)
        logits = F.linear(x, self.w["lm_head.weight"]).float()
        if spec.final_softcap is not None:
            logits = spec.final_softcap * torch.tanh(logits / spec.final_softcap)
        return logits

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
            if cache.length == self._recompute_at:  # transformers' Phi-3 generate: the whole sequence again
                cache = self.new_cache()
                logits = self._run(torch.cat([ids, torch.tensor([out], dtype=torch.long)], 1), cache)
                continue
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


__all__ = ["ACTIVATIONS", "KVCache", "ReferenceModel", "rope_inv_freq"]

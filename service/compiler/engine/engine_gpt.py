"""The GPT-2 / OPT engine model: learned positions, LayerNorm with bias, a plain (ungated) MLP.

Checkpoints: ``GPTForCausalLM`` (converted from HF GPT-2; Conv1D weights are already transposed by
the converter) and ``OPTForCausalLM`` (the converter drops OPT's 2-row position offset, so position
p uses row p of the table, as ``reference.py`` does). Both keep ``[Q; K; V]`` fused and biases on
every linear; OPT with ``do_layer_norm_before=false`` (opt-350m) is post-LN and has no ``ln_f``.

Engine layout ``kiln-gpt-fused/1``: ``embed``, ``pos_embed``; per layer ``attn_norm`` (+ ``_bias``),
``qkv`` (+ bias), ``o`` (+ bias), ``mlp_norm`` (+ ``_bias``), ``fc`` (+ bias), ``proj`` (+ bias);
``final_norm`` (+ ``_bias``, pre-LN only) and ``lm_head``. As in the Llama engine one
``decode_layer`` / ``prefill_layer`` serves every layer (weights are arguments, so torch.compile
compiles one layer), the KV cache is static ``[max_batch, kv_heads, max_seq, d]``, batches are
right-padded from position 0, and with tp > 1 each rank holds its heads / MLP columns and sums the
row-parallel outputs (biases added once, after the sum) and gathers the vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .engine_model import compile_kwargs, decode_mask, gather_vocab, prefill_attention

GPT_LAYOUT = "kiln-gpt-fused/1"
GPT_ARCHS = ("GPTForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM")
LAYER_FIELDS = ("attn_norm", "attn_norm_bias", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm", "mlp_norm_bias",
                "fc", "fc_bias", "proj", "proj_bias")
_CKPT_FIELDS = ("input_layernorm.weight", "input_layernorm.bias", "attention.qkv.weight", "attention.qkv.bias",
                "attention.dense.weight", "attention.dense.bias", "post_layernorm.weight", "post_layernorm.bias",
                "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias")
# HF activation names (what reference.py accepts for these families); gelu_new is GPT-2's tanh form
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")


def is_post_ln(cfg: dict) -> bool:
    """OPT with ``do_layer_norm_before`` false: x = ln1(x + attn(x)); x = ln2(x + mlp(x)); no ln_f."""
    return cfg.get("architecture") == "OPTForCausalLM" and not cfg.get("do_layer_norm_before", True)


def activation_name(cfg: dict) -> str:
    act = cfg.get("hidden_act") or ("relu" if cfg.get("architecture") == "OPTForCausalLM" else "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported by the GPT engine (supported: {', '.join(ACTIVATIONS)})")
    return act


def gpt_engine_table(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(engine tensor, checkpoint tensors concatenated along dim 0), global layer indices."""
    if cfg.get("position_embedding_type", "learned_absolute") != "learned_absolute":
        raise ValueError(f"{cfg.get('architecture')} engines need learned_absolute positions, "
                         f"got {cfg.get('position_embedding_type')!r}")
    activation_name(cfg)
    table: list[tuple[str, tuple[str, ...]]] = [("embed", ("transformer.vocab_embedding.weight",)),
                                                ("pos_embed", ("transformer.position_embedding.weight",))]
    for i in range(int(cfg["num_hidden_layers"])):
        p, e = f"transformer.layers.{i}.", f"layers.{i}."
        table += [(e + f, (p + c,)) for f, c in zip(LAYER_FIELDS, _CKPT_FIELDS, strict=True)]
    if not is_post_ln(cfg):
        table += [("final_norm", ("transformer.ln_f.weight",)), ("final_norm_bias", ("transformer.ln_f.bias",))]
    table.append(("lm_head", ("lm_head.weight",)))
    return table


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return F.relu(x)
    if act == "gelu":
        return F.gelu(x)  # exact erf form, HF's "gelu"
    if act in ("silu", "swish"):
        return F.silu(x)
    return F.gelu(x, approximate="tanh")  # gelu_new / gelu_pytorch_tanh / gelu_fast


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, w.shape, w, b, eps)


def _row_parallel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, group) -> torch.Tensor:
    """x @ w.T summed over the tensor-parallel ranks (each holds a slice of the inputs); bias once."""
    y = F.linear(x, w)
    if group is not None:
        import torch.distributed._functional_collectives as funcol

        y = funcol.all_reduce(y, "sum", group)
    return y + b


def _finish_layer(h: torch.Tensor, attn: torch.Tensor, w: tuple, eps: float, act: str, post_ln: bool,
                  group) -> torch.Tensor:
    """Attention output projection + residual, then the MLP block, pre-LN or post-LN."""
    ln1, ln1_b, _, _, wo, bo, ln2, ln2_b, wfc, bfc, wproj, bproj = w
    h = h + _row_parallel(attn, wo, bo, group)
    if post_ln:
        h = layer_norm(h, ln1, ln1_b, eps)
        return layer_norm(h + _row_parallel(activation(F.linear(h, wfc, bfc), act), wproj, bproj, group),
                          ln2, ln2_b, eps)
    return h + _row_parallel(activation(F.linear(layer_norm(h, ln2, ln2_b, eps), wfc, bfc), act), wproj, bproj, group)


def decode_layer(h: torch.Tensor, w: tuple, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                 mask: torch.Tensor, nh: int, nkv: int, d: int, eps: float, act: str, post_ln: bool,
                 group=None) -> torch.Tensor:
    """One token per row. h [B, H]; caches [B, nkv, S, d]; pos [B]; mask [B, 1, 1, S]."""
    B = h.shape[0]
    x = h if post_ln else layer_norm(h, w[0], w[1], eps)
    q, k, v = F.linear(x, w[2], w[3]).split([nh * d, nkv * d, nkv * d], -1)
    rows = torch.arange(B, device=h.device)
    k_cache[rows, :, pos] = k.view(B, nkv, d)
    v_cache[rows, :, pos] = v.view(B, nkv, d)
    attn = F.scaled_dot_product_attention(q.view(B, nkv, nh // nkv, d), k_cache, v_cache, attn_mask=mask)
    return _finish_layer(h, attn.reshape(B, nh * d), w, eps, act, post_ln, group)


def prefill_layer(h: torch.Tensor, w: tuple, k_cache: torch.Tensor, v_cache: torch.Tensor, nh: int, nkv: int,
                  d: int, eps: float, act: str, post_ln: bool, group=None) -> torch.Tensor:
    """A right-padded batch from position 0. h [B, T, H]; caches [B, nkv, S, d]."""
    B, T, _ = h.shape
    x = h if post_ln else layer_norm(h, w[0], w[1], eps)
    q, k, v = F.linear(x, w[2], w[3]).split([nh * d, nkv * d, nkv * d], -1)
    q = q.view(B, T, nh, d).transpose(1, 2)
    k = k.view(B, T, nkv, d).transpose(1, 2)
    v = v.view(B, T, nkv, d).transpose(1, 2)
    attn = prefill_attention(q, k, v, k_cache, v_cache)
    return _finish_layer(h, attn, w, eps, act, post_ln, group)


def lm_head(h: torch.Tensor, norm: torch.Tensor | None, norm_b: torch.Tensor | None, head: torch.Tensor,
            eps: float) -> torch.Tensor:
    if norm is not None and norm_b is not None:
        h = layer_norm(h, norm, norm_b, eps)
    return F.linear(h, head).float()


class GPTEngineModel:
    """Weights (GPT engine layout) + static KV cache + the step functions; the same interface as
    ``EngineModel`` (decode / prefill / compile), so ``Engine`` batches, samples and captures CUDA
    graphs of it unchanged."""

    def __init__(self, cfg: dict, weights: dict[str, torch.Tensor], *, max_batch: int, max_seq: int,
                 tp_group=None, tp_size: int = 1):
        """With ``tp_size`` > 1 the weights are this rank's slice (heads, MLP columns, vocab-padded
        lm_head rows; norms, embeddings and row-parallel biases whole) and ``tp_group`` sums the
        row-parallel outputs and gathers the vocab."""
        if cfg.get("architecture") not in GPT_ARCHS:
            raise ValueError(f"GPTEngineModel runs {', '.join(GPT_ARCHS)}, not {cfg.get('architecture')!r}")
        self.cfg, self.group, self.tp = cfg, tp_group, tp_size
        self.nh, self.d = int(cfg["num_attention_heads"]) // tp_size, int(cfg["head_size"])
        self.nkv = max(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]) // tp_size, 1)
        self.eps = float(cfg.get("norm_epsilon") or 1e-5)
        self.act, self.post_ln = activation_name(cfg), is_post_ln(cfg)
        self.vocab = int(cfg["vocab_size"])
        self.max_batch, self.max_seq = max_batch, max_seq
        self.embed, self.pos_embed = weights["embed"], weights["pos_embed"]
        if max_seq > self.pos_embed.shape[0]:
            raise ValueError(f"max_seq_len={max_seq} exceeds the {self.pos_embed.shape[0]} learned positions")
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.layers: list[tuple] = [tuple(weights[f"layers.{i}.{f}"] for f in LAYER_FIELDS)
                                    for i in range(int(cfg["num_hidden_layers"]))]
        self.final_norm, self.final_norm_bias = weights.get("final_norm"), weights.get("final_norm_bias")
        if not self.post_ln and (self.final_norm is None or self.final_norm_bias is None):
            raise ValueError("a pre-LN GPT engine needs final_norm and final_norm_bias")
        self.head = weights["lm_head"][: self.vocab] if tp_size == 1 else weights["lm_head"]
        shape = (max_batch, self.nkv, max_seq, self.d)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.slots = torch.arange(max_seq, device=self.device)
        self._decode_layer: Callable[..., torch.Tensor] = decode_layer
        self._prefill_layer: Callable[..., torch.Tensor] = prefill_layer
        self._head: Callable[..., torch.Tensor] = lm_head

    def compile(self, mode: str | None = None, options: dict | None = None) -> None:
        kw = compile_kwargs(mode, options)
        self._decode_layer = torch.compile(decode_layer, dynamic=False, **kw)
        self._head = torch.compile(lm_head, dynamic=False, **kw)
        self._prefill_layer = torch.compile(prefill_layer, dynamic=True, **kw)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, kv: int | None = None) -> torch.Tensor:
        """ids, pos [B] -> float32 logits [B, vocab]; writes K/V at pos, reads the first ``kv`` slots."""
        B = ids.shape[0]
        kv = kv or self.max_seq
        h = F.embedding(ids, self.embed) + F.embedding(pos, self.pos_embed)
        mask = decode_mask(self.slots, pos, kv, self.dtype)
        for i, w in enumerate(self.layers):
            h = self._decode_layer(h, w, self.k_cache[i][:B, :, :kv], self.v_cache[i][:B, :, :kv], pos, mask,
                                   self.nh, self.nkv, self.d, self.eps, self.act, self.post_ln, self.group)
        return self._gather_vocab(self._head(h, self.final_norm, self.final_norm_bias, self.head, self.eps))

    def _gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_vocab(logits, self.group, self.vocab)

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, *, all_logits: bool = False,
                row0: int = 0) -> torch.Tensor:
        """ids [B, T] right-padded, lengths [B] -> float32 logits of each row's last token [B, vocab]
        (or of every token [B, T, vocab]); K/V go to cache rows [row0, row0 + B)."""
        B, T = ids.shape
        h = F.embedding(ids, self.embed) + self.pos_embed[:T]
        for i, w in enumerate(self.layers):
            h = self._prefill_layer(h, w, self.k_cache[i][row0:row0 + B], self.v_cache[i][row0:row0 + B],
                                    self.nh, self.nkv, self.d, self.eps, self.act, self.post_ln, self.group)
        if not all_logits:
            h = h[torch.arange(B, device=h.device), lengths - 1]
        return self._gather_vocab(lm_head(h, self.final_norm, self.final_norm_bias, self.head, self.eps))

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

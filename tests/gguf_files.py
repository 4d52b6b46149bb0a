"""Tiny GGUF files written the way llama.cpp's converter writes them, for the compiler and service tests.

``write_gguf(model, arch, path, rng)`` saves a transformers model with llama.cpp's tensor names
(gguf-py ``tensor_mapping``, spelled out here independently of Kiln's own table), Llama's q/k rows
in interleaved rotary order, Gemma's norms stored as 1 + w, and a mix of tensor types: F32 norms and
biases, F16 embeddings, Q8_0 attention, Q5_1 o_proj / lm_head, Q4_0 MLP and K-quant down_proj
(Q4_K / Q6_K blocks of random codes with sane scales: the ``gguf`` package cannot quantize K-quants).
"""

from __future__ import annotations

import gguf
import numpy as np

from service.compiler.sources.gguf import GGML_TYPES

Q = gguf.GGMLQuantizationType
V, H, D, INTER = 96, 64, 16, 256
COMMON = dict(hidden_size=H, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V, max_position_embeddings=128, rms_norm_eps=1e-5)
# GGUF arch -> (transformers class, config)
FAMILIES = {
    "llama": lambda T: T.LlamaForCausalLM(T.LlamaConfig(**COMMON, tie_word_embeddings=False)),
    "qwen2": lambda T: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, tie_word_embeddings=True, use_sliding_window=False)),
    # transformers' GGUF loader ignores qwen3.attention.key_length (Qwen3Config's head_dim 128 stands)
    "qwen3": lambda T: T.Qwen3ForCausalLM(T.Qwen3Config(**{**COMMON, "num_attention_heads": 2, "num_key_value_heads": 1},
                                                        head_dim=128, tie_word_embeddings=True)),
    "gemma2": lambda T: T.Gemma2ForCausalLM(T.Gemma2Config(**COMMON, head_dim=D, sliding_window=32)),
    "gemma3": lambda T: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**COMMON, head_dim=D, sliding_window=32)),
    "phi3": lambda T: T.Phi3ForCausalLM(T.Phi3Config(**COMMON, pad_token_id=0, tie_word_embeddings=False)),
}
# llama.cpp's tensor names (gguf-py tensor_mapping), written out independently of Kiln's table
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm"}
GEMMA_LAYER = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(arch: str, hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    table = {**LAYER, **(GEMMA_LAYER if arch.startswith("gemma") else {})}
    return f"blk.{layer}.{table[module]}.{kind}"


def half_to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permute of Llama q/k rows (HF half-split -> interleaved rotary pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant(shape: tuple[int, int], qtype, rng) -> np.ndarray:
    """K-quant blocks of random codes with sane fp16 scales (the writer cannot quantize K-quants)."""
    block, size = GGML_TYPES[int(qtype)][1:]
    blocks = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin first
        blocks[..., 0:2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
        blocks[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    elif qtype == Q.Q6_K:  # d last
        blocks[..., size - 2:] = np.frombuffer(np.float16(0.0005).tobytes(), np.uint8)
    return blocks.reshape(shape[0], -1)


def pick_type(hf: str, layer_parity: int):
    if hf.endswith("bias") or "norm" in hf:
        return Q.F32
    if "down_proj" in hf:
        return Q.Q4_K if layer_parity == 0 else Q.Q6_K
    if "embed_tokens" in hf:
        return Q.F16
    if "lm_head" in hf or "o_proj" in hf:
        return Q.Q5_1
    if "mlp" in hf:
        return Q.Q4_0
    return Q.Q8_0


def rope_theta(cfg) -> float:
    return float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0))


def write_gguf(model, arch: str, path, rng, extra: dict[str, np.ndarray] | None = None,
               extra_kv: dict[str, int | float] | None = None) -> None:
    """``extra``: more tensors written as they are (e.g. Llama 3.1's ``rope_freqs.weight``); ``extra_kv``: more
    metadata (ints as uint32, floats as float32)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", rope_theta(cfg))
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    for key, value in (("bos_token_id", 1), ("eos_token_id", 2), ("padding_token_id", 0)):
        w.add_uint32(f"tokenizer.ggml.{key}", value)
    if arch in ("qwen3", "gemma2", "gemma3"):
        w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
        w.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
    if arch.startswith("gemma"):
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    for key, value in (extra_kv or {}).items():
        w.add_uint32(key, value) if isinstance(value, int) else w.add_float32(key, value)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.detach().float().numpy().copy()
        if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            a = half_to_interleaved(a, cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads)
        if arch.startswith("gemma") and hf.endswith("norm.weight"):
            a = a + 1.0
        qtype = pick_type(hf, int(hf.split(".")[2]) % 2 if ".layers." in hf else 0)
        name = gguf_name(arch, hf)
        if qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, random_kquant(a.shape, qtype, rng), raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

"""Meta consolidated checkpoints written from a transformers Llama, the way Meta's training code shards them.

``write_meta_checkpoint(model, params, folder, shards, embed_dim)``: q/k rows back to Meta's
interleaved rotary order, column-parallel weights (wq wk wv w1 w3 output) split along dim 0,
row-parallel ones (wo w2) along dim 1, the embedding along ``embed_dim`` (1: Llama 1/2's
ParallelEmbedding, 0: Llama 3's VocabParallelEmbedding), norms replicated, plus ``rope.freqs``.
"""

from __future__ import annotations

import json

import torch


def half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary row order -> Meta's (the inverse of convert_llama_weights_to_hf's permute)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_checkpoint(model, params: dict, folder, shards: int, embed_dim: int) -> None:
    """Save an HF Llama as Meta's consolidated.NN.pth shards + params.json."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    nh, nkv = params["n_heads"], params["n_kv_heads"]
    meta: dict[str, tuple[torch.Tensor, int | None]] = {
        "tok_embeddings.weight": (sd["model.embed_tokens.weight"], embed_dim),
        "norm.weight": (sd["model.norm.weight"], None),
        "output.weight": (sd["lm_head.weight"], 0),
        "rope.freqs": (torch.ones(8), None),  # Llama 2 ships it; the converter ignores it
    }
    for i in range(params["n_layers"]):
        p = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": (half_to_interleaved(sd[p + "self_attn.q_proj.weight"], nh), 0),
            f"layers.{i}.attention.wk.weight": (half_to_interleaved(sd[p + "self_attn.k_proj.weight"], nkv), 0),
            f"layers.{i}.attention.wv.weight": (sd[p + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (sd[p + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (sd[p + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (sd[p + "mlp.down_proj.weight"], 1),
            f"layers.{i}.feed_forward.w3.weight": (sd[p + "mlp.up_proj.weight"], 0),
            f"layers.{i}.attention_norm.weight": (sd[p + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (sd[p + "post_attention_layernorm.weight"], None),
        })
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = {k: (t if d is None else t.chunk(shards, dim=d)[s]).clone().contiguous() for k, (t, d) in meta.items()}
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
    (folder / "params.json").write_text(json.dumps({k: v for k, v in params.items() if v is not None}))

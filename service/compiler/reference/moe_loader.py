"""Merge a Mixture-of-Experts checkpoint (``models/moe.py``) of any TP x EP x PP split into whole tensors.

Undoes TensorRT-LLM's split: attention as the Llama family (fused qkv per rank [Q_r; K_r; V_r] with
de-duplicated KV heads, ``attention.dense`` row-parallel), the stacked experts ``mlp.fc`` [E_r, 2 x I_r, H]
(each expert [up slice; gate slice]) and ``mlp.proj`` [E_r, H, I_r] put back from the moe_tp slices
(tp_rank // moe_ep_size) and the expert ranges (tp_rank % moe_ep_size), the shared expert's fused
[up_r; gate_r] and its row-parallel proj; router, norms and the shared expert gate from tp rank 0.
Every tensor is checked against the shapes ``models.moe`` derives from config.json first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint.mapping import Mapping
from ..checkpoint.safetensors_io import SafetensorsFile
from ..errors import InvalidCheckpoint, KilnError
from ..models.moe import MOE, moe_settings


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = t.shape[-2] // 2
    return t[..., :n, :], t[..., n:, :]


def load_moe_weights(ckpt_dir: str | os.PathLike, cfg: dict) -> dict[str, torch.Tensor]:
    """Whole tensors under their global checkpoint names (tp = ep = pp = 1 equivalent)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        m = Mapping.from_dict(cfg["mapping"])
        expected = {r: {n: (s, d) for n, s, d in MOE.expected(cfg, r)} for r in m.ranks()}
        experts = moe_settings(cfg)[0]
    except (KilnError, KeyError, TypeError, ValueError) as exc:
        raise InvalidCheckpoint(f"config.json: {exc}") from exc
    tp, ep, mtp = m.tp_size, m.moe_ep, m.moe_tp
    nh, d = int(cfg["num_attention_heads"]), int(cfg["head_size"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    files = {r: SafetensorsFile(ckpt_dir / f"rank{r}.safetensors") for r in m.ranks()}
    w: dict[str, torch.Tensor] = {}
    try:
        def get(rank: int, name: str) -> torch.Tensor:
            if name not in files[rank]:
                raise InvalidCheckpoint(f"rank{rank}.safetensors lacks {name}")
            t = files[rank].tensor(name)
            shape, dt = expected[rank][name]
            if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                raise InvalidCheckpoint(f"rank{rank}.safetensors: {name} is {list(t.shape)} {t.dtype}, "
                                        f"config.json implies {list(shape)} {dt}")
            return t.clone()

        last = m.pp_size - 1
        w["transformer.vocab_embedding.weight"] = get(m.rank(0, 0), "transformer.vocab_embedding.weight")
        w["transformer.ln_f.weight"] = get(m.rank(0, last), "transformer.ln_f.weight")
        head = torch.cat([get(m.rank(t, last), "lm_head.weight") for t in range(tp)], 0)
        w["lm_head.weight"] = head[: cfg["vocab_size"]]  # drop the rows padding the vocab to a multiple of tp
        q_r, kv_r = nh // tp * d, max(nkv // tp, 1) * d
        kv_ranks = list(range(tp)) if nkv >= tp else list(range(0, tp, tp // nkv))
        for s in range(m.pp_size):
            ranks = [m.rank(t, s) for t in range(tp)]
            for local, i in enumerate(m.pp_layers(cfg["num_hidden_layers"], s)):
                p, g = f"transformer.layers.{local}.", f"transformer.layers.{i}."
                names = expected[ranks[0]]
                for n in ("input_layernorm.weight", "post_layernorm.weight", "mlp.router.weight",
                          "attention.q_layernorm.weight", "attention.k_layernorm.weight",
                          "mlp.shared_expert_gate.weight"):
                    if p + n in names:
                        w[g + n] = get(ranks[0], p + n)
                for n in ("attention.qkv.weight", "attention.qkv.bias"):
                    if p + n in names:
                        parts = [get(r, p + n) for r in ranks]
                        w[g + n] = torch.cat([torch.cat([t[:q_r] for t in parts]),
                                              torch.cat([parts[t][q_r:q_r + kv_r] for t in kv_ranks]),
                                              torch.cat([parts[t][q_r + kv_r:] for t in kv_ranks])])
                w[g + "attention.dense.weight"] = torch.cat([get(r, p + "attention.dense.weight") for r in ranks], 1)
                # experts: rank tp_rank holds experts [ep_rank x E_r, ...) cut to moe_tp slice tp_rank // ep
                fc = [get(r, p + "mlp.fc.weight") for r in ranks]
                proj = [get(r, p + "mlp.proj.weight") for r in ranks]
                fcs, projs = [], []
                for e in range(ep):
                    held = [fc[mt * ep + e] for mt in range(mtp)]
                    fcs.append(torch.cat([torch.cat([_halves(t)[0] for t in held], 1),
                                          torch.cat([_halves(t)[1] for t in held], 1)], 1))
                    projs.append(torch.cat([proj[mt * ep + e] for mt in range(mtp)], 2))
                w[g + "mlp.fc.weight"], w[g + "mlp.proj.weight"] = torch.cat(fcs, 0), torch.cat(projs, 0)
                if w[g + "mlp.fc.weight"].shape[0] != experts:
                    raise InvalidCheckpoint(f"{g}mlp.fc.weight merges to {w[g + 'mlp.fc.weight'].shape[0]} experts, "
                                            f"config.json has {experts}")
                if p + "mlp.shared_expert.fc.weight" in names:
                    parts = [get(r, p + "mlp.shared_expert.fc.weight") for r in ranks]
                    w[g + "mlp.shared_expert.fc.weight"] = torch.cat([torch.cat([_halves(t)[0] for t in parts]),
                                                                      torch.cat([_halves(t)[1] for t in parts])])
                    w[g + "mlp.shared_expert.proj.weight"] = torch.cat(
                        [get(r, p + "mlp.shared_expert.proj.weight") for r in ranks], 1)
    finally:
        for f in files.values():
            f.close()
    return w


__all__ = ["load_moe_weights"]

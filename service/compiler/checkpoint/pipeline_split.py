"""Pipeline-stage partitioning by per-layer cost, for heterogeneous (Nemotron-NAS) models.

TensorRT-LLM gives every stage the same number of layers. With NAS layers that is unbalanced: a
no-op/linear-attention layer with a narrow FFN costs a fraction of a full layer. This module
prices each layer from the checkpoint config alone and offers both splits:

- ``even_split``: TensorRT-LLM's split (the compatible default; n % pp == 0 keeps every
  TensorRT-LLM version happy);
- ``balanced_split``: the contiguous split whose most loaded stage, on the most unbalanced of
  weight bytes / FLOPs per token / KV-cache bytes per token, is as light as possible (the first
  stage also holds the embedding, the last ln_f and lm_head); ties go to the smallest summed
  share. Kiln's own engine runs it (``Mapping.layers_per_stage``); TensorRT-LLM's loader does not.

    from service.compiler.checkpoint.pipeline_split import balanced_mapping, split_record, format_split
    mapping = balanced_mapping(checkpoint_or_hf_config, tp=8, pp=2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache

from ..errors import InvalidMapping
from ..models.base import TORCH_DTYPES, pad_vocab
from ..models.nemotron_nas import LayerConfig, checkpoint_layers
from .mapping import Mapping

DEFAULT_CONTEXT_LEN = 4096  # tokens of context priced into attention FLOPs (QK^T and AV)
METRICS = ("weight_bytes", "flops_per_token", "kv_cache_bytes_per_token")


@dataclass(frozen=True)
class Cost:
    weight_bytes: int = 0
    flops_per_token: int = 0
    kv_cache_bytes_per_token: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, m) + getattr(other, m) for m in METRICS))


_FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # without importing torch (kiln convert's fast path)


def _dtype_bytes(cfg: dict) -> int:
    name = cfg.get("dtype", "bfloat16")
    return _FLOAT_BYTES[name] if name in _FLOAT_BYTES else TORCH_DTYPES[name].itemsize


def layer_cost(cfg: dict, layer: LayerConfig, tp: int = 1, context_len: int = DEFAULT_CONTEXT_LEN) -> Cost:
    """Weight bytes, FLOPs per token (2 per multiply-add) and KV-cache bytes per token of one layer
    on one GPU of a tp-wide stage (KV heads duplicated when fewer than tp; norms replicated)."""
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    d = cfg.get("head_size") or H // nh
    b = _dtype_bytes(cfg)
    params = flops = kv = 0
    if layer.attention == "attention":
        q, kv_rows = nh * d // tp, max(layer.num_kv_heads // tp, 1) * d
        mat = (q + 2 * kv_rows) * H + H * q
        params, flops, kv = H + mat, 2 * mat + 4 * q * context_len, 2 * kv_rows * b
    elif layer.attention == "linear":
        params, flops = H + H * H // tp, 2 * H * H // tp
    if layer.ffn == "mlp":
        params += H + 3 * H * (layer.intermediate_size // tp)
        flops += 6 * H * (layer.intermediate_size // tp)
    elif layer.ffn == "linear":
        params += H + H * H // tp
        flops += 2 * H * H // tp
    return Cost(params * b, flops, kv)


def layer_costs(cfg: dict, tp: int = 1, context_len: int = DEFAULT_CONTEXT_LEN) -> list[Cost]:
    return [layer_cost(cfg, layer, tp, context_len) for layer in checkpoint_layers(cfg)]


def edge_costs(cfg: dict, tp: int = 1) -> tuple[Cost, Cost]:
    """Per GPU: (first stage extra: the replicated embedding table, last stage extra: ln_f and its
    slice of the vocab-padded lm_head)."""
    H, V, b = cfg["hidden_size"], cfg["vocab_size"], _dtype_bytes(cfg)
    head_rows = pad_vocab(V, tp) // tp
    return Cost(V * H * b, 0, 0), Cost((head_rows * H + H) * b, 2 * head_rows * H, 0)


def kv_cache_bytes_per_token(cfg: dict, tp_size: int = 1) -> int:
    """KV-cache bytes per token per rank: only real attention layers have a cache (duplicated KV
    heads count once per rank that holds them)."""
    d = cfg.get("head_size") or cfg["hidden_size"] // cfg["num_attention_heads"]
    b = _dtype_bytes(cfg)
    return sum(2 * max(layer.num_kv_heads // tp_size, 1) * d * b
               for layer in checkpoint_layers(cfg) if layer.attention == "attention")


def even_split(num_layers: int, pp: int) -> list[int]:
    """TensorRT-LLM's split (``torch.tensor_split``: the first n % pp stages get one more layer)."""
    if pp > num_layers:
        raise InvalidMapping(f"pp_size={pp} is larger than num_hidden_layers={num_layers}")
    return [num_layers // pp + (1 if s < num_layers % pp else 0) for s in range(pp)]


def stage_costs(cfg: dict, sizes: list[int], tp: int = 1, context_len: int = DEFAULT_CONTEXT_LEN) -> list[Cost]:
    """Cost of each stage on one of its GPUs."""
    costs = layer_costs(cfg, tp, context_len)
    first, last = edge_costs(cfg, tp)
    out, start = [], 0
    for s, n in enumerate(sizes):
        c = sum(costs[start:start + n], Cost())
        if s == 0:
            c = c + first
        if s == len(sizes) - 1:
            c = c + last
        out.append(c)
        start += n
    return out


def _shares(stage: Cost, totals: Cost) -> list[float]:
    """A stage's share of each metric's model total (metrics the model lacks are left out)."""
    return [getattr(stage, m) / getattr(totals, m) for m in METRICS if getattr(totals, m)]


def _minimax(n: int, pp: int, cost: Callable[[int, int, int], float]) -> tuple[float, list[int]]:
    """Contiguous split of n layers into pp non-empty stages minimizing max_s cost(i, j, s)."""
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp)]  # best[s][j]: layers [0, j) on stages 0..s
    cut = [[0] * (n + 1) for _ in range(pp)]  # cut[s][j]: first layer of stage s
    for j in range(1, n + 1):
        best[0][j] = cost(0, j, 0)
    for s in range(1, pp):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                v = max(best[s - 1][i], cost(i, j, s))
                if v < best[s][j] - 1e-12:
                    best[s][j], cut[s][j] = v, i
    sizes, j = [], n
    for s in range(pp - 1, 0, -1):
        sizes.append(j - cut[s][j])
        j = cut[s][j]
    return best[pp - 1][n], [j] + sizes[::-1]


def balanced_split(cfg: dict, pp: int, tp: int = 1, context_len: int = DEFAULT_CONTEXT_LEN) -> list[int]:
    """The contiguous split whose worst stage, on its worst metric, is smallest (the bottleneck);
    among those, the one whose largest summed share over all metrics is smallest. Exact (DP)."""
    costs = layer_costs(cfg, tp, context_len)
    n = len(costs)
    if pp > n:
        raise InvalidMapping(f"pp_size={pp} is larger than num_hidden_layers={n}")
    first, last = edge_costs(cfg, tp)
    totals = sum(costs, first + last)
    prefix = [Cost()]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @cache
    def shares(i: int, j: int, s: int) -> list[float]:  # layers [i, j) as stage s
        c = Cost(*(getattr(prefix[j], m) - getattr(prefix[i], m) for m in METRICS))
        c = c + first if s == 0 else c
        c = c + last if s == pp - 1 else c
        return _shares(c, totals)

    bottleneck, _ = _minimax(n, pp, lambda i, j, s: max(shares(i, j, s)))
    _, sizes = _minimax(n, pp, lambda i, j, s: sum(shares(i, j, s))
                        if max(shares(i, j, s)) <= bottleneck + 1e-9 else float("inf"))
    return sizes


def spread(stages: list[Cost]) -> dict[str, float]:
    """Per metric: slowest stage over the mean ("max_over_mean"; 1.0 is perfect) and (max-min)/mean."""
    out: dict[str, float] = {}
    for m in METRICS:
        vals = [getattr(c, m) for c in stages]
        mean = sum(vals) / len(vals)
        out[m + "_max_over_mean"] = round(max(vals) / mean, 4) if mean else 1.0
        out[m + "_rel_spread"] = round((max(vals) - min(vals)) / mean, 4) if mean else 0.0
    # the bottleneck the balanced split minimizes: the worst metric's slowest stage over its mean
    out["worst_max_over_mean"] = max(out[m + "_max_over_mean"] for m in METRICS)
    return out


def _describe(cfg: dict, sizes: list[int], tp: int, context_len: int) -> dict:
    stages = stage_costs(cfg, sizes, tp, context_len)
    starts = [sum(sizes[:s]) for s in range(len(sizes))]
    return {
        "layers_per_stage": list(sizes),
        "stages": [dict(asdict(c), first_layer=a, num_layers=n) for c, a, n in zip(stages, starts, sizes, strict=True)],
        "spread": spread(stages),
    }


def split_record(cfg: dict, mapping: Mapping, context_len: int = DEFAULT_CONTEXT_LEN) -> dict:
    """What goes in the checkpoint config (``kiln_pipeline_split``): the split used, and both
    candidate splits with their per-stage costs."""
    n, pp, tp = cfg["num_hidden_layers"], mapping.pp_size, mapping.tp_size
    used = mapping.stage_sizes(n) if mapping.layers_per_stage is not None or n % pp == 0 else even_split(n, pp)
    even = even_split(n, pp)
    balanced = balanced_split(cfg, pp, tp, context_len)
    kind = "even" if used == even else "balanced" if used == balanced else "custom"
    return {
        "split": kind,
        "layers_per_stage": used,
        "trtllm_compatible": used == even and n % pp == 0,
        "cost_model": {"metrics": list(METRICS), "per": f"GPU (tp_size={tp})", "context_len": context_len,
                       "objective": "minimize the largest stage share of any metric, then of their sum"},
        "even": _describe(cfg, even, tp, context_len),
        "balanced": _describe(cfg, balanced, tp, context_len),
    }


def balanced_mapping(cfg: dict, tp: int, pp: int, context_len: int = DEFAULT_CONTEXT_LEN) -> Mapping:
    """A Mapping with the cost-balanced split. ``cfg`` is a checkpoint config, or an HF DeciLM
    config.json (normalized here)."""
    if "layer_configs" not in cfg and "architectures" in cfg:
        from ..models import spec_for_hf

        cfg = spec_for_hf(cfg).trt_config(cfg, "bfloat16", Mapping())
    return Mapping(tp_size=tp, pp_size=pp, layers_per_stage=tuple(balanced_split(cfg, pp, tp, context_len)))


def format_split(record: dict) -> str:
    """Lines for the convert summary and the job report."""
    lines = [f"pipeline split used: {record['split']} {record['layers_per_stage']}"
             + ("" if record["trtllm_compatible"] else " (Kiln engine only)")
             + f"; per-stage cost per {record['cost_model']['per']}"]
    for kind in ("even", "balanced"):
        r = record[kind]
        sp = r["spread"]
        lines.append(
            f"  {kind:8s} {r['layers_per_stage']}: weights "
            + " / ".join(f"{s['weight_bytes'] / 1e9:.2f}" for s in r["stages"]) + " GB, "
            + "GFLOP/token " + " / ".join(f"{s['flops_per_token'] / 1e9:.2f}" for s in r["stages"]) + ", "
            + "KV KiB/token " + " / ".join(f"{s['kv_cache_bytes_per_token'] / 1024:.0f}" for s in r["stages"])
            + f"; slowest stage / mean: weights {sp['weight_bytes_max_over_mean']:.3f}, "
            f"FLOPs {sp['flops_per_token_max_over_mean']:.3f}, KV {sp['kv_cache_bytes_per_token_max_over_mean']:.3f}, "
            f"worst {sp['worst_max_over_mean']:.3f}")
    return "\n".join(lines)

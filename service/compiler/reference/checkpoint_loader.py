"""Read a TensorRT-LLM checkpoint of any TP x PP split back into whole (tp=1, pp=1) weights.

``load_checkpoint_weights(dir)`` opens ``config.json`` and every ``rank{N}.safetensors`` (through
``safetensors.safe_open``, never pickle), undoes the tensor-parallel split (fused qkv per rank
[Q_r; K_r; V_r] with de-duplicated KV heads, column-parallel tensors on dim 0, row-parallel on
dim 1, replicated norms / embeddings / row-parallel biases from tp rank 0), renumbers the
stage-local layer indices to global ones (even split, or Kiln's ``mapping.layers_per_stage``) and
cuts the zero padding off ``lm_head``. Names stay the checkpoint's own
(``transformer.layers.7.attention.qkv.weight``); values keep the checkpoint dtype.

Every per-rank shape and dtype is checked against ``config.json``; anything off (missing file or
tensor, a tensor the format does not define, a wrong shape, a layer beyond its stage) raises
``InvalidCheckpoint`` naming the file and the tensor.

    config, weights = load_checkpoint_weights("./ckpt")
    weights["lm_head.weight"].shape        # (vocab_size, hidden_size)
"""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoint.mapping import Mapping
from ..errors import InvalidCheckpoint, InvalidMapping, UnsupportedArchitecture

# Qwen3 and Gemma share the Llama tensor rules, plus q/k norms and the sandwich's extra norms
QK_NORM_DENSE = ("Qwen3ForCausalLM",)
GEMMA_FAMILY = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM") + QK_NORM_DENSE + GEMMA_FAMILY
GPT_FAMILY = ("GPTForCausalLM", "GPT2LMHeadModel")
OPT_FAMILY = ("OPTForCausalLM",)
PHI3_FAMILY = ("Phi3ForCausalLM",)  # Llama's tensors, but one fused swiglu mlp.fc [up_r; gate_r] per rank
DECILM = "DeciLMForCausalLM"  # merged by load_decilm_weights (per-layer KV heads, absent parts)
MOE_FAMILY = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")  # merged by moe_loader
SUPPORTED_ARCHITECTURES = LLAMA_FAMILY + GPT_FAMILY + OPT_FAMILY + PHI3_FAMILY + (DECILM,) + MOE_FAMILY

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_CONFIG_BYTES = 16 << 20

_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_QKV = ("attention.qkv.weight", "attention.qkv.bias")
_COLUMN = ("mlp.fc.weight", "mlp.fc.bias", "mlp.gate.weight", "mlp.gate.bias")
_ROW = ("attention.dense.weight", "mlp.proj.weight")
_FIRST_STAGE = ("transformer.vocab_embedding.weight", "transformer.position_embedding.weight")
_LAST_STAGE = ("transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight")


def family(config: dict) -> str:
    """``llama`` (RMSNorm, rope, gated MLP), ``gpt`` (GPT-2), ``opt`` or ``decilm`` (the uniform
    tensor rules of ``tensor_names`` / ``check_complete`` cover the first three)."""
    arch = config.get("architecture")
    if arch in LLAMA_FAMILY:
        return "llama"
    if arch in GPT_FAMILY:
        return "gpt"
    if arch in OPT_FAMILY:
        return "opt"
    if arch in PHI3_FAMILY:
        return "phi3"
    if arch == DECILM:
        return "decilm"
    if arch in MOE_FAMILY:
        return "moe"
    raise UnsupportedArchitecture(
        f"checkpoint architecture {arch!r} is not supported by the reference runtime",
        hint=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
    )


def _positive_int(cfg: dict, key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidCheckpoint(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory, with the format's defaults filled in."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "config.json"
    if not ckpt_dir.is_dir():
        raise InvalidCheckpoint(f"checkpoint directory not found: {ckpt_dir}")
    if not path.is_file():
        raise InvalidCheckpoint(f"{path} not found", hint="a TensorRT-LLM checkpoint holds config.json + rank*.safetensors")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidCheckpoint(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpoint(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise InvalidCheckpoint(f"{path} must hold a JSON object")
    for key in ("architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in cfg:
            raise InvalidCheckpoint(f"config.json lacks the required key {key!r}")
    if cfg["dtype"] not in TORCH_DTYPES:
        raise InvalidCheckpoint(f"config.json: dtype {cfg['dtype']!r} is not one of {', '.join(TORCH_DTYPES)}")
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg.get("head_size") is None:
        cfg["head_size"] = cfg["hidden_size"] // max(int(cfg["num_attention_heads"]), 1)
    if cfg.get("intermediate_size") is None:
        cfg["intermediate_size"] = 4 * cfg["hidden_size"]
    if cfg.get("mapping") is None:
        cfg["mapping"] = {"world_size": 1, "tp_size": 1, "pp_size": 1}
    return cfg


def checkpoint_mapping(cfg: dict) -> Mapping:
    if not isinstance(cfg.get("mapping"), dict):
        raise InvalidCheckpoint(f"config.json: mapping must be an object, got {cfg.get('mapping')!r}")
    try:
        m = Mapping.from_dict(cfg["mapping"])
        m.stage_sizes(cfg["num_hidden_layers"])
    except (InvalidMapping, TypeError, ValueError) as exc:
        raise InvalidCheckpoint(f"config.json: invalid mapping {cfg['mapping']!r}: {exc}") from exc
    return m


@dataclass(frozen=True)
class Geometry:
    """The model's sizes from config.json, checked against the tensor-parallel split."""

    hidden: int
    heads: int
    kv_heads: int
    head_size: int
    inter: int
    vocab: int
    max_pos: int
    tp: int
    swiglu: bool = False  # mlp.fc holds [up; gate] (2 x inter rows), each rank its own halves

    @property
    def kv_per_rank(self) -> int:
        return max(self.kv_heads // self.tp, 1)

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab // self.tp) * self.tp

    def kv_source_ranks(self) -> list[int]:
        """TP ranks whose K/V rows, concatenated, give every KV head once."""
        if self.kv_heads >= self.tp:
            return list(range(self.tp))
        return list(range(0, self.tp, self.tp // self.kv_heads))

    @classmethod
    def from_config(cls, cfg: dict, tp: int) -> Geometry:
        g = cls(
            hidden=_positive_int(cfg, "hidden_size"), heads=_positive_int(cfg, "num_attention_heads"),
            kv_heads=_positive_int(cfg, "num_key_value_heads"), head_size=_positive_int(cfg, "head_size"),
            inter=_positive_int(cfg, "intermediate_size"), vocab=_positive_int(cfg, "vocab_size"),
            max_pos=int(cfg.get("max_position_embeddings") or 0), tp=tp, swiglu=cfg.get("hidden_act") == "swiglu",
        )
        problems = []
        if g.heads % tp:
            problems.append(f"num_attention_heads={g.heads} is not divisible by tp_size={tp}")
        if g.heads % g.kv_heads:
            problems.append(f"num_attention_heads={g.heads} is not a multiple of num_key_value_heads={g.kv_heads}")
        if g.kv_heads >= tp and g.kv_heads % tp:
            problems.append(f"num_key_value_heads={g.kv_heads} is not divisible by tp_size={tp}")
        if g.kv_heads < tp and tp % g.kv_heads:
            problems.append(f"tp_size={tp} is not a multiple of num_key_value_heads={g.kv_heads}")
        if g.inter % tp:
            problems.append(f"intermediate_size={g.inter} is not divisible by tp_size={tp}")
        if problems:
            raise InvalidCheckpoint("config.json: " + "; ".join(problems))
        return g

    def global_shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of a merged tensor (layer names without the ``transformer.layers.i.`` prefix)."""
        H, d, inter = self.hidden, self.head_size, self.inter
        qkv = (self.heads + 2 * self.kv_heads) * d
        return {
            "transformer.vocab_embedding.weight": (self.vocab, H),
            "transformer.position_embedding.weight": (self.max_pos, H),
            "transformer.ln_f.weight": (H,), "transformer.ln_f.bias": (H,),
            "lm_head.weight": (self.vocab, H),
            "input_layernorm.weight": (H,), "input_layernorm.bias": (H,),
            "attention.q_layernorm.weight": (d,), "attention.k_layernorm.weight": (d,),
            "pre_feedforward_layernorm.weight": (H,), "post_feedforward_layernorm.weight": (H,),
            "post_layernorm.weight": (H,), "post_layernorm.bias": (H,),
            "attention.qkv.weight": (qkv, H), "attention.qkv.bias": (qkv,),
            "attention.dense.weight": (H, self.heads * d), "attention.dense.bias": (H,),
            "mlp.fc.weight": ((2 if self.swiglu else 1) * inter, H), "mlp.fc.bias": (inter,),
            "mlp.gate.weight": (inter, H), "mlp.gate.bias": (inter,),
            "mlp.proj.weight": (H, inter), "mlp.proj.bias": (H,),
        }.get(name)


def tensor_names(cfg: dict) -> tuple[set[str], set[str], set[str]]:
    """(required global names, required per-layer suffixes, optional per-layer suffixes).

    Per-layer suffixes follow ``transformer.layers.{i}.``; optional ones are biases the runtime
    uses when present (Llama-family ``attention.dense.bias`` with ``attn_bias``, for instance).
    """
    fam = family(cfg)
    layer_req = {"input_layernorm.weight", "attention.qkv.weight", "attention.dense.weight",
                 "post_layernorm.weight", "mlp.fc.weight", "mlp.proj.weight"}
    glob_req = {"transformer.vocab_embedding.weight", "lm_head.weight"}
    layer_opt: set[str] = set()
    if fam == "phi3":
        glob_req.add("transformer.ln_f.weight")
    elif fam == "llama":
        layer_req.add("mlp.gate.weight")
        glob_req.add("transformer.ln_f.weight")
        attn_bias = {"attention.qkv.bias"}
        mlp_bias = {"mlp.fc.bias", "mlp.gate.bias", "mlp.proj.bias"}
        if cfg.get("attn_bias"):
            layer_req |= attn_bias
        if cfg.get("mlp_bias"):
            layer_req |= mlp_bias
        layer_opt = (attn_bias | mlp_bias | {"attention.dense.bias"}) - layer_req
        arch = cfg.get("architecture")
        if arch in QK_NORM_DENSE or arch == "Gemma3ForCausalLM":
            layer_req |= {"attention.q_layernorm.weight", "attention.k_layernorm.weight"}
        if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
            layer_req |= {"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"}
    else:
        layer_req |= {"input_layernorm.bias", "attention.qkv.bias", "attention.dense.bias",
                      "post_layernorm.bias", "mlp.fc.bias", "mlp.proj.bias"}
        glob_req.add("transformer.position_embedding.weight")
        if fam == "gpt" or cfg.get("do_layer_norm_before", True):
            glob_req |= {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    return glob_req, layer_req, layer_opt


def _merge_rule(suffix: str) -> str:
    if suffix in _QKV:
        return "qkv"
    if suffix in _COLUMN:
        return "column"
    if suffix in _ROW:
        return "row"
    return "replicate"


class _Ranks:
    """The open rank files of one checkpoint; every read is shape- and dtype-checked."""

    def __init__(self, ckpt_dir: Path, world: int, dtype: str, stack: ExitStack):
        self.dir, self.dtype = ckpt_dir, dtype
        self.files: dict[int, Any] = {}
        self.keys: dict[int, set[str]] = {}
        for r in range(world):
            path = ckpt_dir / f"rank{r}.safetensors"
            if not path.is_file():
                raise InvalidCheckpoint(f"{path.name} is missing from {ckpt_dir} (mapping has world_size={world})")
            try:
                f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise InvalidCheckpoint(f"{path.name}: not a readable safetensors file: {exc}") from exc
            self.files[r], self.keys[r] = f, set(f.keys())

    def shape(self, rank: int, name: str) -> tuple[int, ...]:
        if name not in self.keys[rank]:
            raise InvalidCheckpoint(f"rank{rank}.safetensors lacks tensor {name}")
        sl = self.files[rank].get_slice(name)
        if sl.get_dtype() != _ST_DTYPES[self.dtype]:
            raise InvalidCheckpoint(
                f"rank{rank}.safetensors: tensor {name} is {sl.get_dtype()}, config.json dtype is {self.dtype}"
            )
        return tuple(sl.get_shape())

    def get(self, rank: int, name: str, want: tuple[int, ...]) -> torch.Tensor:
        got = self.shape(rank, name)
        if got != tuple(want):
            raise InvalidCheckpoint(
                f"rank{rank}.safetensors: tensor {name} has shape {list(got)}, config.json implies {list(want)}"
            )
        return self.files[rank].get_tensor(name)


def _merge(files: _Ranks, ranks: list[int], name: str, suffix: str, g: Geometry, cfg: dict) -> torch.Tensor:
    """One whole tensor from the copies / slices held by the tp ranks ``ranks`` of a stage."""
    T = g.tp
    full = g.global_shape(suffix)
    if full is None:  # caller filters unknown names; keep the error typed anyway
        raise InvalidCheckpoint(f"rank{ranks[0]}.safetensors: unknown tensor {name}")
    rule = _merge_rule(suffix)
    rest = full[1:]
    if name == "lm_head.weight":
        parts = [files.get(r, name, (g.padded_vocab // T,) + rest) for r in ranks]
        return torch.cat(parts, 0)[: g.vocab]
    if name == "transformer.vocab_embedding.weight" and cfg.get("use_parallel_embedding") and T > 1:
        if int(cfg.get("embedding_sharding_dim", 0)) == 0:
            parts = [files.get(r, name, (g.padded_vocab // T, g.hidden)) for r in ranks]
            return torch.cat(parts, 0)[: g.vocab]
        if g.hidden % T:
            raise InvalidCheckpoint(f"hidden_size={g.hidden} cannot be sharded over tp_size={T} ({name})")
        return torch.cat([files.get(r, name, (g.vocab, g.hidden // T)) for r in ranks], 1)
    if rule == "replicate":
        for r in ranks[1:]:  # copies on the other ranks must at least have the right shape
            if files.shape(r, name) != full:
                raise InvalidCheckpoint(
                    f"rank{r}.safetensors: tensor {name} has shape {list(files.shape(r, name))}, "
                    f"config.json implies {list(full)}"
                )
        return files.get(ranks[0], name, full)
    if rule == "column" and g.swiglu and suffix == "mlp.fc.weight":  # ranks' [up_r; gate_r] -> [up; gate]
        halves = [files.get(r, name, (full[0] // T,) + rest).chunk(2, 0) for r in ranks]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
    if rule == "column":
        return torch.cat([files.get(r, name, (full[0] // T,) + rest) for r in ranks], 0)
    if rule == "row":
        return torch.cat([files.get(r, name, (full[0], full[1] // T)) for r in ranks], 1)
    # qkv: each rank holds [Q_r; K_r; V_r]
    q_r, kv_r = g.heads // T * g.head_size, g.kv_per_rank * g.head_size
    parts = [files.get(r, name, (q_r + 2 * kv_r,) + rest) for r in ranks]
    kv_ranks = g.kv_source_ranks()
    q = torch.cat([p[:q_r] for p in parts], 0)
    k = torch.cat([parts[t][q_r:q_r + kv_r] for t in kv_ranks], 0)
    v = torch.cat([parts[t][q_r + kv_r:] for t in kv_ranks], 0)
    return torch.cat([q, k, v], 0)


def load_checkpoint_weights(ckpt_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, whole weights): the tp=1, pp=1 equivalent of a checkpoint, global layer indices.

    Tensors keep the checkpoint dtype and live on the CPU. A checkpoint without ``lm_head.weight``
    but with ``tie_word_embeddings`` gets the embedding table as its head (TensorRT-LLM's shared
    table).
    """
    ckpt_dir = Path(ckpt_dir)
    cfg = read_config(ckpt_dir)
    if cfg.get("architecture") == DECILM:
        return cfg, load_decilm_weights(ckpt_dir, cfg)
    if cfg.get("architecture") in MOE_FAMILY and not (cfg.get("quantization") or {}).get("quant_algo"):
        from .moe_loader import load_moe_weights

        return cfg, load_moe_weights(ckpt_dir, cfg)
    family(cfg)
    q = cfg.get("quantization") or {}
    if isinstance(q, dict) and (q.get("quant_algo") or q.get("kv_cache_quant_algo")):
        # Quantized: the tensors as stored (int8 / fp8 / packed int4 + scales), run through qlinear.
        from ..quantization.qlinear import load_quantized_checkpoint

        return cfg, load_quantized_checkpoint(ckpt_dir)[1]
    m = checkpoint_mapping(cfg)
    g = Geometry.from_config(cfg, m.tp_size)
    known_glob, layer_req, layer_opt = tensor_names(cfg)
    known_layer = layer_req | layer_opt
    L = cfg["num_hidden_layers"]
    weights: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        files = _Ranks(ckpt_dir, m.world_size, cfg["dtype"], stack)
        for s in range(m.pp_size):
            ranks = [m.rank(t, s) for t in range(m.tp_size)]
            layers = m.pp_layers(L, s)
            names = files.keys[ranks[0]]
            for r in ranks[1:]:
                if files.keys[r] != names:
                    diff = sorted(files.keys[r] ^ names)
                    raise InvalidCheckpoint(
                        f"rank{r}.safetensors and rank{ranks[0]}.safetensors (same pipeline stage {s}) hold "
                        f"different tensors, e.g. {', '.join(diff[:3])}"
                    )
            first, last = s == 0, s == m.pp_size - 1
            for name in sorted(names):
                hit = _LAYER.match(name)
                if hit:
                    local, suffix = int(hit.group(1)), hit.group(2)
                    if suffix not in known_layer:
                        raise InvalidCheckpoint(
                            f"rank{ranks[0]}.safetensors: tensor {name} is not part of a {cfg['architecture']} "
                            "checkpoint the reference runtime understands"
                        )
                    if local >= len(layers):
                        raise InvalidCheckpoint(
                            f"rank{ranks[0]}.safetensors: tensor {name} is beyond stage {s}'s "
                            f"{len(layers)} layers (mapping {cfg['mapping']})"
                        )
                    weights[f"transformer.layers.{layers[local]}.{suffix}"] = _merge(
                        files, ranks, name, suffix, g, cfg)
                    continue
                if name not in known_glob:
                    raise InvalidCheckpoint(
                        f"rank{ranks[0]}.safetensors: tensor {name} is not part of a {cfg['architecture']} "
                        "checkpoint the reference runtime understands"
                    )
                # Copies of a global tensor on a stage that does not own it are ignored.
                if (name in _FIRST_STAGE and not first) or (name in _LAST_STAGE and not last):
                    continue
                weights[name] = _merge(files, ranks, name, name, g, cfg)
    if "lm_head.weight" not in weights and cfg.get("tie_word_embeddings") and \
            "transformer.vocab_embedding.weight" in weights:
        weights["lm_head.weight"] = weights["transformer.vocab_embedding.weight"].clone()
    check_complete(cfg, weights)
    return cfg, weights


def _merge_kv(parts: list[torch.Tensor], num_kv: int, tp: int) -> torch.Tensor:
    """Undo the KV split: with fewer KV heads than ranks each head sits on tp // num_kv ranks."""
    if num_kv >= tp:
        return torch.cat(parts, 0)
    return torch.cat(parts[:: tp // num_kv], 0)


def load_decilm_weights(ckpt_dir: str | os.PathLike, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """A Nemotron-NAS / DeciLM checkpoint of any TP x PP split merged into whole tensors under their
    global checkpoint names (each layer with its own KV heads, parts a layer lacks absent)."""
    from ..checkpoint.safetensors_io import SafetensorsFile
    from ..models.nemotron_nas import checkpoint_layers

    ckpt_dir = Path(ckpt_dir)
    cfg = cfg or read_config(ckpt_dir)
    layers = checkpoint_layers(cfg)
    m = Mapping.from_dict(cfg["mapping"])
    tp, nh, d = m.tp_size, int(cfg["num_attention_heads"]), int(cfg["head_size"])
    files = {r: SafetensorsFile(ckpt_dir / f"rank{r}.safetensors") for r in m.ranks()}

    def get(rank: int, name: str) -> torch.Tensor:
        if name not in files[rank]:
            raise InvalidCheckpoint(f"rank{rank}.safetensors lacks {name}")
        return files[rank].tensor(name).clone()

    w: dict[str, torch.Tensor] = {}
    try:
        last = m.pp_size - 1
        w["transformer.vocab_embedding.weight"] = get(m.rank(0, 0), "transformer.vocab_embedding.weight")
        w["transformer.ln_f.weight"] = get(m.rank(0, last), "transformer.ln_f.weight")
        head = torch.cat([get(m.rank(t, last), "lm_head.weight") for t in range(tp)], 0)
        w["lm_head.weight"] = head[: cfg["vocab_size"]]  # drop the zero rows padding the vocab to a multiple of tp
        for s in range(m.pp_size):
            ranks = [m.rank(t, s) for t in range(tp)]
            for local, i in enumerate(m.pp_layers(cfg["num_hidden_layers"], s)):
                layer, p, g = layers[i], f"transformer.layers.{local}.", f"transformer.layers.{i}."

                def cat(name: str, dim: int) -> torch.Tensor:
                    return torch.cat([get(r, p + name) for r in ranks], dim)  # noqa: B023

                if layer.attention != "no_op":
                    w[g + "input_layernorm.weight"] = get(ranks[0], p + "input_layernorm.weight")
                if layer.attention == "attention":
                    q_r, kv_r = nh // tp * d, max(layer.num_kv_heads // tp, 1) * d
                    parts = [get(r, p + "attention.qkv.weight") for r in ranks]
                    w[g + "attention.qkv.weight"] = torch.cat([
                        torch.cat([t[:q_r] for t in parts], 0),
                        _merge_kv([t[q_r:q_r + kv_r] for t in parts], layer.num_kv_heads, tp),
                        _merge_kv([t[q_r + kv_r:] for t in parts], layer.num_kv_heads, tp)], 0)
                    w[g + "attention.dense.weight"] = cat("attention.dense.weight", 1)
                elif layer.attention == "linear":
                    w[g + "attention.weight"] = cat("attention.weight", 0)
                if layer.ffn != "no_op":
                    w[g + "post_layernorm.weight"] = get(ranks[0], p + "post_layernorm.weight")
                if layer.ffn == "mlp":
                    w[g + "ffn.fc.weight"], w[g + "ffn.gate.weight"] = cat("ffn.fc.weight", 0), cat("ffn.gate.weight", 0)
                    w[g + "ffn.proj.weight"] = cat("ffn.proj.weight", 1)
                elif layer.ffn == "linear":
                    w[g + "ffn.weight"] = cat("ffn.weight", 0)
    finally:
        for f in files.values():
            f.close()
    return w


def check_complete(cfg: dict, weights: dict[str, torch.Tensor]) -> None:
    """Raise ``InvalidCheckpoint`` naming missing, unknown or mis-shaped tensors of merged weights."""
    glob_req, layer_req, layer_opt = tensor_names(cfg)
    L = int(cfg["num_hidden_layers"])
    want = sorted(glob_req) + [f"transformer.layers.{i}.{s}" for i in range(L) for s in sorted(layer_req)]
    missing = [n for n in want if n not in weights]
    if missing:
        raise InvalidCheckpoint(
            f"checkpoint lacks {len(missing)} tensor(s) its config.json requires: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    nh = int(cfg["num_attention_heads"])
    g = Geometry.from_config({
        **cfg, "num_key_value_heads": cfg.get("num_key_value_heads") or nh,
        "head_size": cfg.get("head_size") or int(cfg["hidden_size"]) // nh,
        "intermediate_size": cfg.get("intermediate_size") or 4 * int(cfg["hidden_size"]),
    }, tp=1)
    for name, t in weights.items():
        hit = _LAYER.match(name)
        if hit and int(hit.group(1)) < L and hit.group(2) in layer_req | layer_opt:
            shape = g.global_shape(hit.group(2))
        elif not hit and name in glob_req:
            shape = g.global_shape(name)
        else:
            raise InvalidCheckpoint(f"weights hold {name}, which a {cfg['architecture']} model does not have")
        if tuple(t.shape) != shape:
            raise InvalidCheckpoint(f"{name} has shape {list(t.shape)}, config.json implies {list(shape or ())}")


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Geometry",
    "check_complete",
    "checkpoint_mapping",
    "family",
    "load_checkpoint_weights",
    "load_decilm_weights",
    "read_config",
    "tensor_names",
]

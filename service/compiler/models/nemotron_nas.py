"""Nemotron-NAS / DeciLM (DeciLMForCausalLM) -> TensorRT-LLM checkpoint, from config.json alone.

Every layer is Llama-like, but NAS may replace its attention or FFN by one H x H linear layer or
remove it, and gives each layer its own KV-head count and FFN width. TensorRT-LLM reads these
models only with ``--trust_remote_code``; Kiln reads the two config forms as data and never imports
the repository's ``modeling_decilm.py``:

- ``block_configs`` (Llama-3_1-Nemotron-51B): per layer ``attention`` {``n_heads_in_group`` |
  ``no_op`` | ``replace_with_linear``} and ``ffn`` {``ffn_mult`` | ``no_op`` | ``replace_with_linear``};
- ``num_key_value_heads_per_layer`` (DeciLM-7B): per-layer KV heads, every layer attention + MLP.

The checkpoint follows TensorRT-LLM's nemotron_nas converter: normalized ``layer_configs``, ``ffn.``
instead of ``mlp.``, ``attention.weight`` / ``ffn.weight`` for linear replacements, no tensor at all
(not even the layernorm) for no-op parts, per-layer TP splits with KV-head duplication. ModelOpt
exports (already TensorRT-LLM-shaped, with ``attn_replacing_linear`` / ``mlp_replacing_linear``
names) are imported by ``import_modelopt_checkpoint``.

    from service.compiler import Mapping, convert_checkpoint
    from service.compiler.checkpoint.pipeline_split import balanced_mapping
    convert_checkpoint("./Nemotron-51B", "./ckpt", mapping=balanced_mapping(hf_cfg, tp=8, pp=2))
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint.mapping import Mapping
from ..errors import InvalidArgument, InvalidCheckpoint, InvalidMapping, OutputExists, UnsupportedArchitecture
from ..sources.weights import SourceTensor, WeightSource, read_json
from .base import (
    Piece,
    RawTensorSpec,
    Rule,
    SplitContext,
    TableArch,
    W,
    check_attention_split,
    check_divisible,
    column,
    pad_vocab,
    qkv_separate,
    replicate,
    row,
    vocab_parallel,
)
from .hf_config import base_quantization, rope_settings
from .spec import MLP, Attention, Block, ModelSpec, Norm, activation, rope_of

if TYPE_CHECKING:
    import torch

ARCH = "DeciLMForCausalLM"
ATTENTION_IMPLS = ("attention", "linear", "no_op")
FFN_IMPLS = ("mlp", "linear", "no_op")
SUPPORTED_ROPE = {None, "linear", "llama3"}
# Switches of the remote-code AttentionConfig / FFNConfig that Kiln accepts only at their default.
ATTENTION_DEFAULTS = {"window_length": None, "num_sink_tokens": None, "unshifted_sink": False,
                      "use_prefill_window_in_sink_attention": False}
ATTENTION_KEYS = {"no_op", "replace_with_linear", "n_heads_in_group", "sparsify", *ATTENTION_DEFAULTS}
FFN_KEYS = {"no_op", "replace_with_linear", "ffn_mult", "sparsify"}


@dataclass(frozen=True)
class LayerConfig:
    """One normalized layer: attention in ATTENTION_IMPLS, ffn in FFN_IMPLS (TensorRT-LLM's schema)."""

    attention: str
    num_kv_heads: int  # 0 unless attention == "attention"
    ffn: str
    intermediate_size: int  # 0 unless ffn == "mlp"

    def to_dict(self) -> dict:
        return {"attention": {"impl": self.attention, "num_key_value_heads": self.num_kv_heads or None},
                "ffn": {"impl": self.ffn, "intermediate_size": self.intermediate_size or None}}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden: int) -> int:
    """TensorRT-LLM's and DeciLM's rounding: round_up(int(2 * ffn_mult * hidden / 3), 256)."""
    size = int(2 * ffn_mult * hidden / 3)
    return -(-size // 256) * 256


def _switch(block: dict, key: str, where: str) -> bool:
    value = block.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _check_block_keys(block: object, known: set[str], where: str) -> dict:
    if not isinstance(block, dict):
        raise InvalidArgument(f"{where} must be an object, got {block!r}")
    unknown = sorted(set(block) - known)
    if unknown:
        raise UnsupportedArchitecture(
            f"{where} has switches Kiln does not know: {', '.join(unknown)}",
            hint=f"known switches: {', '.join(sorted(known))}; newer NAS block types need remote code "
            "that Kiln does not run",
        )
    if block.get("sparsify"):
        raise UnsupportedArchitecture(
            f"{where}.sparsify={block['sparsify']!r}: sparsified NAS blocks are not supported "
            "(TensorRT-LLM refuses them too)"
        )
    if _switch(block, "no_op", where) and _switch(block, "replace_with_linear", where):
        raise InvalidArgument(f"{where} sets both no_op and replace_with_linear")
    return block


def _attention_layer(block: object, heads: int, where: str) -> tuple[str, int]:
    block = _check_block_keys(block, ATTENTION_KEYS, where)
    for key, default in ATTENTION_DEFAULTS.items():
        if block.get(key, default) not in (default, None):
            raise UnsupportedArchitecture(f"{where}.{key}={block[key]!r} is not supported (only {default!r})")
    if _switch(block, "no_op", where):
        return "no_op", 0
    if _switch(block, "replace_with_linear", where):
        return "linear", 0
    group = block.get("n_heads_in_group")
    if not isinstance(group, int) or isinstance(group, bool) or group < 1 or heads % group:
        raise InvalidArgument(
            f"{where}.n_heads_in_group={group!r} does not divide num_attention_heads={heads}",
            hint="every attention block needs a positive n_heads_in_group dividing the head count",
        )
    return "attention", heads // group


def _ffn_layer(block: object, hidden: int, where: str) -> tuple[str, int]:
    block = _check_block_keys(block, FFN_KEYS, where)
    if _switch(block, "no_op", where):
        return "no_op", 0
    if _switch(block, "replace_with_linear", where):
        return "linear", 0
    mult = block.get("ffn_mult")
    if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
        raise InvalidArgument(f"{where}.ffn_mult must be a positive number, got {mult!r}")
    return "mlp", ffn_mult_to_intermediate_size(float(mult), hidden)


def _positive_int(hf: dict, key: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"config.json {key} must be a positive integer, got {value!r}")
    return value


def read_hf_layers(hf: dict) -> list[LayerConfig]:
    """Per-layer configs from an HF DeciLM config.json (either form), checked for consistency."""
    n = _positive_int(hf, "num_hidden_layers")
    heads = _positive_int(hf, "num_attention_heads")
    hidden = _positive_int(hf, "hidden_size")
    blocks, per_layer_kv = hf.get("block_configs"), hf.get("num_key_value_heads_per_layer")
    if blocks is not None and per_layer_kv is not None:
        raise InvalidArgument(
            "config.json has both block_configs and num_key_value_heads_per_layer",
            hint="a DeciLM config uses one form or the other; remove the stale one",
        )
    if blocks is not None:
        if not isinstance(blocks, list) or len(blocks) != n:
            got = len(blocks) if isinstance(blocks, list) else repr(blocks)
            raise InvalidArgument(f"block_configs has {got} entries, num_hidden_layers is {n}")
        layers = []
        for i, b in enumerate(blocks):
            where = f"block_configs[{i}]"
            b = _check_block_keys(b, {"attention", "ffn"}, where)
            if "attention" not in b or "ffn" not in b:
                raise InvalidArgument(f"{where} needs both 'attention' and 'ffn'")
            attn, kv = _attention_layer(b["attention"], heads, where + ".attention")
            ffn, inter = _ffn_layer(b["ffn"], hidden, where + ".ffn")
            layers.append(LayerConfig(attn, kv, ffn, inter))
        return layers
    inter = _positive_int(hf, "intermediate_size")
    if per_layer_kv is not None:
        if not isinstance(per_layer_kv, list) or len(per_layer_kv) != n:
            got = len(per_layer_kv) if isinstance(per_layer_kv, list) else repr(per_layer_kv)
            raise InvalidArgument(f"num_key_value_heads_per_layer has {got} entries, num_hidden_layers is {n}")
        for i, kv in enumerate(per_layer_kv):
            if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1 or heads % kv:
                raise InvalidArgument(
                    f"num_key_value_heads_per_layer[{i}]={kv!r} does not divide num_attention_heads={heads}")
        return [LayerConfig("attention", kv, "mlp", inter) for kv in per_layer_kv]
    kv = int(hf.get("num_key_value_heads") or heads)
    return [LayerConfig("attention", kv, "mlp", inter)] * n


def checkpoint_layers(cfg: dict) -> list[LayerConfig]:
    """Per-layer configs of a checkpoint config.json: ``layer_configs`` with nulls falling back to the
    global values (TensorRT-LLM's ``get_layer_config``); configs without it are uniform Llama layers."""
    n = cfg["num_hidden_layers"]
    g_kv = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    g_inter = int(cfg.get("intermediate_size") or 0)
    raw = cfg.get("layer_configs")
    if raw is None:
        return [LayerConfig("attention", g_kv, "mlp", g_inter)] * n
    if not isinstance(raw, list) or len(raw) != n:
        raise InvalidCheckpoint(f"layer_configs must list num_hidden_layers={n} layers")
    out = []
    for i, entry in enumerate(raw):
        try:
            attn, ffn = entry["attention"], entry["ffn"]
            a_impl, f_impl = attn["impl"], ffn["impl"]
        except (TypeError, KeyError) as exc:
            raise InvalidCheckpoint(f"layer_configs[{i}] lacks attention.impl / ffn.impl") from exc
        if a_impl not in ATTENTION_IMPLS or f_impl not in FFN_IMPLS:
            raise InvalidCheckpoint(f"layer_configs[{i}] has unknown impl {a_impl!r} / {f_impl!r}")
        kv = int(attn.get("num_key_value_heads") or g_kv) if a_impl == "attention" else 0
        inter = int(ffn.get("intermediate_size") or g_inter) if f_impl == "mlp" else 0
        if f_impl == "mlp" and not inter:
            raise InvalidCheckpoint(f"layer_configs[{i}] is an mlp without an intermediate_size")
        out.append(LayerConfig(a_impl, kv, f_impl, inter))
    return out


def with_kv_heads(rule: Rule, num_kv: int) -> Rule:
    """A split rule seeing this layer's KV-head count instead of the global one."""

    def per_layer(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
        return rule(dataclasses.replace(ctx, num_kv_heads=num_kv), src, t)

    return per_layer


DECILM_LAYOUT = "kiln-decilm-fused/1"
_ATTENTION_KIND = {"attention": "full", "linear": "linear", "no_op": "none"}
_FFN_KIND = {"mlp": "gated", "linear": "linear", "no_op": "none"}


def block_specs(cfg: dict) -> ModelSpec:
    """Llama-like layers whose attention may be full (its own KV heads), one H x H linear or absent,
    and whose FFN may be a gated silu MLP (its own width), one linear or absent; the FFN's checkpoint
    module is ``ffn``."""
    nh, d = int(cfg["num_attention_heads"]), int(cfg["head_size"])
    norm = Norm("rms", float(cfg.get("norm_epsilon") or 1e-5))
    rope, act = rope_of(cfg, d), activation(cfg.get("hidden_act"), "silu")
    blocks = tuple(
        Block(Attention(_ATTENTION_KIND[layer.attention], nh if layer.attention == "attention" else 0,
                        layer.num_kv_heads, d if layer.attention == "attention" else 0,
                        rope=rope if layer.attention == "attention" else None),
              MLP(_FFN_KIND[layer.ffn], act, intermediate_size=layer.intermediate_size), norm, mlp_module="ffn")
        for layer in checkpoint_layers(cfg))
    return ModelSpec(ARCH, int(cfg["hidden_size"]), int(cfg["vocab_size"]), blocks, final_norm=norm,
                     tied_head=bool(cfg.get("tie_word_embeddings")))


def engine_weight_map(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(engine tensor, checkpoint tensors concatenated along dim 0), global layer indices; parts a
    layer does not have have no tensors (layout kiln-decilm-fused/1)."""
    table: list[tuple[str, tuple[str, ...]]] = [("embed", ("transformer.vocab_embedding.weight",))]
    for i, b in enumerate(block_specs(cfg).blocks):
        p, e = f"transformer.layers.{i}.", f"layers.{i}."
        if b.attention.kind != "none":
            table.append((e + "attn_norm", (p + "input_layernorm.weight",)))
        if b.attention.kind == "full":
            table += [(e + "qkv", (p + "attention.qkv.weight",)), (e + "o", (p + "attention.dense.weight",))]
        elif b.attention.kind == "linear":
            table.append((e + "attn_linear", (p + "attention.weight",)))
        if b.mlp.kind != "none":
            table.append((e + "mlp_norm", (p + "post_layernorm.weight",)))
        if b.mlp.kind == "gated":  # fc = silu branch, first
            table += [(e + "gate_up", (p + "ffn.fc.weight", p + "ffn.gate.weight")), (e + "down", (p + "ffn.proj.weight",))]
        elif b.mlp.kind == "linear":
            table.append((e + "ffn_linear", (p + "ffn.weight",)))
    return table + [("final_norm", ("transformer.ln_f.weight",)), ("lm_head", ("lm_head.weight",))]


class NemotronNAS(TableArch):
    hf_architectures = (ARCH,)
    trt_architectures = (ARCH,)
    engine_layout = DECILM_LAYOUT
    block_specs = staticmethod(block_specs)
    engine_weight_map = staticmethod(engine_weight_map)
    hf_prefix_aliases = (("model.", ""),)

    def trt_config(self, hf: dict, dtype: str, mapping: Mapping) -> dict:
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"{ARCH} with hidden_act={hf.get('hidden_act')!r} is not supported")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise UnsupportedArchitecture(f"{ARCH} with {key}=true is not supported")
        rope_theta, scaling = rope_settings(hf)
        if scaling is not None and scaling["type"] not in SUPPORTED_ROPE:
            raise UnsupportedArchitecture(
                f"rope scaling type {scaling['type']!r} is not supported (supported: linear, llama3)")
        layers = read_hf_layers(hf)
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        kv_heads = [layer.num_kv_heads for layer in layers if layer.attention == "attention"]
        inters = [layer.intermediate_size for layer in layers if layer.ffn == "mlp"]
        cfg: dict = {
            "architecture": ARCH,
            "dtype": dtype,
            "logits_dtype": "float32",
            "vocab_size": _positive_int(hf, "vocab_size"),
            "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
            "hidden_size": hidden,
            "num_hidden_layers": len(layers),
            "num_attention_heads": heads,
            # Global fallbacks only: every attention / mlp layer states its own value below.
            "num_key_value_heads": int(hf.get("num_key_value_heads") or max(kv_heads, default=heads)),
            "head_size": int(hf.get("head_dim") or hidden // heads),
            "intermediate_size": int(hf.get("intermediate_size") or max(inters, default=4 * hidden)),
            "hidden_act": "silu",  # DeciConfig's default is gelu: always write it
            "norm_epsilon": float(hf.get("rms_norm_eps", 1e-5)),
            "position_embedding_type": "rope_gpt_neox",
            "rotary_base": rope_theta,
            "rotary_scaling": scaling,
            "mapping": mapping.to_dict(),
            "quantization": base_quantization(),
            "use_parallel_embedding": False,
            "embedding_sharding_dim": 0,
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "layer_configs": [layer.to_dict() for layer in layers],
            "layer_types": [layer.attention for layer in layers],
            "num_kv_heads_per_layer": kv_heads,
        }
        cfg["mapping"] = mapping.config_dict(cfg["num_hidden_layers"])
        return cfg  # from_hugging_face adds kiln_pipeline_split (pipeline_split prices these layers)

    def check_mapping(self, cfg: dict, mapping: Mapping) -> None:
        tp = mapping.tp_size
        layers = checkpoint_layers(cfg)
        check_divisible("num_attention_heads", cfg["num_attention_heads"], "tp_size", tp,
                        hint="choose a tp_size that divides the number of attention heads")
        for i, layer in enumerate(layers):
            try:
                if layer.attention == "attention":
                    check_attention_split(cfg["num_attention_heads"], layer.num_kv_heads, tp)
                if layer.ffn == "mlp":
                    check_divisible("intermediate_size", layer.intermediate_size, "tp_size", tp)
                if "linear" in (layer.attention, layer.ffn):
                    check_divisible("hidden_size (linear replacement)", cfg["hidden_size"], "tp_size", tp)
            except InvalidMapping as exc:
                raise InvalidMapping(f"layer {i}: {exc.message}", hint=exc.hint) from exc
        mapping.stage_sizes(cfg["num_hidden_layers"])

    # -- the spec: names, shapes and dtypes per rank, from config.json alone --------------------
    def tensor_specs(self, cfg: dict, rank: int, m: Mapping, dt: torch.dtype | str,
                     shapes_only: bool) -> list[RawTensorSpec]:
        tp = m.tp_size
        H, nh, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_size"]
        layers = checkpoint_layers(cfg)
        out: list[RawTensorSpec] = []
        if m.is_first_pp_rank(rank):
            out.append(("transformer.vocab_embedding.weight", (cfg["vocab_size"], H), dt))
        for local, i in enumerate(m.pp_layers(cfg["num_hidden_layers"], m.pp_rank(rank))):
            p, layer = f"transformer.layers.{local}.", layers[i]
            if layer.attention == "attention":
                kv_r = max(layer.num_kv_heads // tp, 1)
                out += [(p + "input_layernorm.weight", (H,), dt),
                        (p + "attention.qkv.weight", ((nh // tp + 2 * kv_r) * d, H), dt),
                        (p + "attention.dense.weight", (H, nh * d // tp), dt)]
            elif layer.attention == "linear":
                out += [(p + "input_layernorm.weight", (H,), dt), (p + "attention.weight", (H // tp, H), dt)]
            if layer.ffn == "mlp":
                inter = layer.intermediate_size // tp
                out += [(p + "post_layernorm.weight", (H,), dt),
                        (p + "ffn.fc.weight", (inter, H), dt),
                        (p + "ffn.gate.weight", (inter, H), dt),
                        (p + "ffn.proj.weight", (H, inter), dt)]
            elif layer.ffn == "linear":
                out += [(p + "post_layernorm.weight", (H,), dt), (p + "ffn.weight", (H // tp, H), dt)]
        if m.is_last_pp_rank(rank):
            out.append(("transformer.ln_f.weight", (H,), dt))
            out.append(("lm_head.weight", (pad_vocab(cfg["vocab_size"], tp) // tp, H), dt))
        return out

    # -- the weight table (no rows at all for no-op parts) -------------------------------------
    def layer_table(self, cfg: dict, i: int) -> list[W]:
        layer = checkpoint_layers(cfg)[i]
        a, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        rows: list[W] = []
        if layer.attention != "no_op":
            rows.append(W("input_layernorm.weight", f"model.layers.{i}.input_layernorm.weight", replicate))
        if layer.attention == "attention":
            rows += [W("attention.qkv.weight", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                       with_kv_heads(qkv_separate, layer.num_kv_heads)),
                     W("attention.dense.weight", a + "o_proj.weight", row)]
        elif layer.attention == "linear":
            rows.append(W("attention.weight", a + "linear_attn.weight", column))
        if layer.ffn != "no_op":
            rows.append(W("post_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight", replicate))
        if layer.ffn == "mlp":
            rows += [W("ffn.fc.weight", mlp + "gate_proj.weight", column),  # gate_proj is the activated branch
                     W("ffn.gate.weight", mlp + "up_proj.weight", column),
                     W("ffn.proj.weight", mlp + "down_proj.weight", row)]
        elif layer.ffn == "linear":
            rows.append(W("ffn.weight", mlp + "linear_mlp.weight", column))
        return rows

    def global_table(self, cfg: dict, first: bool, last: bool, source: WeightSource) -> list[W]:
        out = []
        if first:
            out.append(W("transformer.vocab_embedding.weight", "model.embed_tokens.weight", replicate))
        if last:
            out.append(W("transformer.ln_f.weight", "model.norm.weight", replicate))
            head = "lm_head.weight"
            if head not in source:  # TensorRT-LLM's converter always reads lm_head; tied models lack it
                if not cfg.get("tie_word_embeddings"):
                    raise InvalidArgument("lm_head.weight is missing and tie_word_embeddings is false",
                                          hint="the weights do not match config.json")
                head = "model.embed_tokens.weight"
            out.append(W("lm_head.weight", head, vocab_parallel))
        return out


NEMOTRON_NAS = NemotronNAS()


# ---------------------------------------------------------------------------------------------
# ModelOpt exports: TensorRT-LLM-shaped rank files whose names ModelOpt's exporter chose.

MODELOPT_RENAMES = ((".mlp.", ".ffn."), (".attn_replacing_linear.", ".attention."),
                    (".mlp_replacing_linear.", ".ffn."))


def modelopt_name(name: str) -> str:
    """TensorRT-LLM's ``update_weights_following_modelopt_optimization``, as a pure name map."""
    for old, new in MODELOPT_RENAMES:
        name = name.replace(old, new)
    return name


def import_modelopt_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                               overwrite: bool = False) -> Path:
    """Rewrite a ModelOpt-exported NAS checkpoint with canonical names and a normalized config.

    The config may carry ``layer_configs`` or HF-style ``block_configs``. Every rank file is
    checked against the spec before anything is written; the output appears atomically.
    """
    from ..checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter, dtype_name, publish_dir

    src, out = Path(src_dir), Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputExists(f"output directory already exists: {out}")
    cfg: dict = dict(read_json(src / "config.json", "ModelOpt config.json"))
    if cfg.get("architecture") != ARCH:
        raise UnsupportedArchitecture(f"ModelOpt export architecture {cfg.get('architecture')!r} is not {ARCH}")
    if cfg.get("block_configs") is not None:
        if cfg.get("layer_configs") is not None:
            raise InvalidArgument("ModelOpt config.json has both block_configs and layer_configs")
        cfg["layer_configs"] = [layer.to_dict() for layer in read_hf_layers(cfg)]
        del cfg["block_configs"]
    layers = checkpoint_layers(cfg)
    cfg["layer_types"] = [layer.attention for layer in layers]
    cfg["num_kv_heads_per_layer"] = [layer.num_kv_heads for layer in layers if layer.attention == "attention"]
    mapping = Mapping.from_dict(cfg.get("mapping", {}))
    NEMOTRON_NAS.check_mapping(cfg, mapping)
    files = {r: SafetensorsFile(src / f"rank{r}.safetensors") for r in mapping.ranks()
             if (src / f"rank{r}.safetensors").exists()}
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        renamed: dict[int, dict[str, str]] = {}
        for r in mapping.ranks():
            if r not in files:
                raise InvalidCheckpoint(f"ModelOpt export lacks rank{r}.safetensors")
            renamed[r] = {modelopt_name(n): n for n in files[r].keys()}
            expected = {n: (tuple(s), dtype_name(dt)) for n, s, dt in NEMOTRON_NAS.expected(cfg, r)}
            got = {n: (files[r].infos[o].shape, files[r].infos[o].dtype) for n, o in renamed[r].items()}
            missing = sorted(set(expected) - set(got))
            wrong = sorted(n for n in set(expected) & set(got) if got[n] != expected[n])
            if missing or wrong:
                raise InvalidCheckpoint(
                    f"rank{r}.safetensors after ModelOpt renames: missing {missing[:5]}, mis-shaped {wrong[:5]}")
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for r, names in renamed.items():
            f = files[r]
            with SafetensorsWriter(tmp / f"rank{r}.safetensors",
                                   [(n, f.infos[o].dtype, f.infos[o].shape) for n, o in names.items()],
                                   metadata={"format": "pt", "producer": "kiln modelopt import"}) as w:
                for n, o in names.items():
                    w.write(n, 0, f.tensor(o))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for f in files.values():
            f.close()
    return out

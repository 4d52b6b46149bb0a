"""Building blocks shared by every architecture: the conversion plan and the tensor-parallel split rules.

A conversion is *data*: for every output tensor of every rank, a ``TensorPlan`` lists the source
regions ("pieces") whose row-wise concatenation forms it. Pieces are expressed in the output
orientation ([out_features, in_features]); a piece may read its source transposed (GPT-2 Conv1D
stores [in, out]) or be zero rows (vocab padding). The executor in ``convert.py`` streams pieces in
bounded row chunks, so no tensor ever has to be materialized whole.

Split rules turn (source tensors, rank) into pieces; an architecture is a table of
(checkpoint name, HF name(s), rule) rows plus a ``trt_config`` mapping and an ``expected`` spec.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, overload

from ..checkpoint.mapping import Mapping
from ..checkpoint.safetensors_io import DTYPES, LazyMap, itemsize
from ..errors import InvalidMapping, UnsupportedArchitecture, WeightsMismatch
from ..sources.weights import DTYPE_CODES, SourceTensor, WeightSource

if TYPE_CHECKING:
    import torch

    from .spec import ModelSpec

# checkpoint dtype name -> torch dtype; resolved (and torch imported) on first use
TORCH_DTYPES = LazyMap(lambda: {name: DTYPES[code] for name, code in DTYPE_CODES.items()})
# (name, shape, dtype) of one tensor a rank must hold; plans over a raw source name the dtype by its
# safetensors code ("BF16") instead of a torch dtype
TensorSpec = tuple[str, tuple[int, ...], "torch.dtype"]
RawTensorSpec = tuple[str, tuple[int, ...], "torch.dtype | str"]


@dataclass(frozen=True)
class Piece:
    """Rows [r0, r1) x cols [c0, c1) of ``source`` seen in output orientation (None source = zeros)."""

    source: str | None
    rows: tuple[int, int]
    cols: tuple[int, int] | None = None  # None: all columns (or a 1-D tensor)
    transpose: bool = False
    ncols: int = 0  # width of the block (0 for 1-D)
    add: float = 0.0  # added to every value in float32 before the cast (Gemma's norms: TensorRT-LLM stores 1 + w)

    @property
    def nrows(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a safetensors code ("BF16") in plans over a raw source
    pieces: list[Piece] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SplitContext:
    """What split rules need to know about the model and the rank being written."""

    tp_rank: int
    tp_size: int
    num_heads: int = 0
    num_kv_heads: int = 0
    head_size: int = 0
    vocab_size: int = 0


# ---------------------------------------------------------------------------------------------
# Source geometry in output orientation


def oriented_shape(info: SourceTensor, transpose: bool) -> tuple[int, ...]:
    if len(info.shape) == 2 and transpose:
        return (info.shape[1], info.shape[0])
    return info.shape


def block(info: SourceTensor, r0: int, r1: int, c0: int | None = None, c1: int | None = None,
          transpose: bool = False) -> Piece:
    shape = oriented_shape(info, transpose)
    if not (0 <= r0 <= r1 <= shape[0]):
        raise WeightsMismatch(f"tensor {info.name!r} of shape {list(info.shape)} has no rows {r0}:{r1}")
    if len(shape) == 1:
        return Piece(info.name, (r0, r1), None, transpose, 0)
    cols = None
    width = shape[1]
    if c0 is not None:
        if c1 is None or not (0 <= c0 <= c1 <= shape[1]):
            raise WeightsMismatch(f"tensor {info.name!r} of shape {list(info.shape)} has no columns {c0}:{c1}")
        cols = (c0, c1)
        width = c1 - c0
    return Piece(info.name, (r0, r1), cols, transpose, width)


def _even(n: int, parts: int, what: str, source: str) -> int:
    if n % parts:
        raise InvalidMapping(f"{what} of {source!r} ({n}) is not divisible by tp_size={parts}")
    return n // parts


# ---------------------------------------------------------------------------------------------
# Split rules: (context, source infos, transpose) -> pieces

Rule = Callable[[SplitContext, Sequence[SourceTensor], bool], list[Piece]]


def replicate(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
    (s,) = src
    shape = oriented_shape(s, t)
    return [block(s, 0, shape[0], transpose=t)]


def column(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
    """Column-parallel: split output features (dim 0)."""
    (s,) = src
    shape = oriented_shape(s, t)
    n = _even(shape[0], ctx.tp_size, "output features", s.name)
    return [block(s, ctx.tp_rank * n, (ctx.tp_rank + 1) * n, transpose=t)]


def row(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
    """Row-parallel: split input features (dim 1)."""
    (s,) = src
    shape = oriented_shape(s, t)
    n = _even(shape[1], ctx.tp_size, "input features", s.name)
    return [block(s, 0, shape[0], ctx.tp_rank * n, (ctx.tp_rank + 1) * n, transpose=t)]


def kv_heads_for_rank(num_kv: int, tp_size: int, tp_rank: int) -> range:
    """KV heads held by a rank; with fewer KV heads than ranks each head is repeated consecutively."""
    if num_kv >= tp_size:
        per = num_kv // tp_size
        return range(tp_rank * per, (tp_rank + 1) * per)
    return range(tp_rank // (tp_size // num_kv), tp_rank // (tp_size // num_kv) + 1)


def _head_rows(info: SourceTensor, heads: range, d: int, t: bool, offset: int = 0) -> Piece:
    return block(info, offset + heads.start * d, offset + heads.stop * d, transpose=t)


def qkv_separate(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
    """Fused qkv from separate q/k/v projections: per rank [Q_r; K_r; V_r]."""
    q, k, v = src
    d, nh, nkv = ctx.head_size, ctx.num_heads, ctx.num_kv_heads
    for info, heads in ((q, nh), (k, nkv), (v, nkv)):
        if oriented_shape(info, t)[0] != heads * d:
            raise WeightsMismatch(
                f"tensor {info.name!r} has {oriented_shape(info, t)[0]} output rows, "
                f"config implies {heads} heads x head_size {d} = {heads * d}"
            )
    per_q = nh // ctx.tp_size
    qh = range(ctx.tp_rank * per_q, (ctx.tp_rank + 1) * per_q)
    kvh = kv_heads_for_rank(nkv, ctx.tp_size, ctx.tp_rank)
    return [_head_rows(q, qh, d, t), _head_rows(k, kvh, d, t), _head_rows(v, kvh, d, t)]


def qkv_fused(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
    """Fused qkv from one pre-fused source whose rows are [Q; K; V] (GPT-2 c_attn)."""
    (s,) = src
    d, nh, nkv = ctx.head_size, ctx.num_heads, ctx.num_kv_heads
    total = oriented_shape(s, t)[0]
    if total != (nh + 2 * nkv) * d:
        raise WeightsMismatch(
            f"tensor {s.name!r} has {total} fused qkv rows, config implies ({nh}+2x{nkv}) x {d}"
        )
    per_q = nh // ctx.tp_size
    qh = range(ctx.tp_rank * per_q, (ctx.tp_rank + 1) * per_q)
    kvh = kv_heads_for_rank(nkv, ctx.tp_size, ctx.tp_rank)
    return [
        _head_rows(s, qh, d, t),
        _head_rows(s, kvh, d, t, offset=nh * d),
        _head_rows(s, kvh, d, t, offset=(nh + nkv) * d),
    ]


def pad_vocab(vocab: int, tp_size: int) -> int:
    return -(-vocab // tp_size) * tp_size


def vocab_parallel(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
    """lm_head: zero-pad rows to a multiple of tp_size, then split rows."""
    (s,) = src
    shape = oriented_shape(s, t)
    if shape[0] != ctx.vocab_size:
        raise WeightsMismatch(f"tensor {s.name!r} has {shape[0]} rows, config vocab_size is {ctx.vocab_size}")
    per = pad_vocab(ctx.vocab_size, ctx.tp_size) // ctx.tp_size
    r0, r1 = ctx.tp_rank * per, (ctx.tp_rank + 1) * per
    pieces = []
    if r0 < shape[0]:
        pieces.append(block(s, r0, min(r1, shape[0]), transpose=t))
    if r1 > shape[0]:
        pieces.append(Piece(None, (0, r1 - max(r0, shape[0])), None, False, shape[1]))
    return pieces


def plus_one(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
    """Replicated, every value + 1 (in float32, then cast): TensorRT-LLM's Gemma converter stores the
    (1 + w) scale of Gemma's RMSNorm, so its runtime applies a plain RMSNorm."""
    return [replace(p, add=1.0) for p in replicate(ctx, src, t)]


def offset_rows(offset: int) -> Rule:
    """Whole tensor minus its first ``offset`` rows (OPT's learned positions carry a 2-row offset)."""

    def rule(ctx: SplitContext, src: Sequence[SourceTensor], t: bool) -> list[Piece]:
        (s,) = src
        return [block(s, offset, oriented_shape(s, t)[0], transpose=t)]

    return rule


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class W:
    """One row of a weight table: checkpoint name <- HF name(s) via a split rule."""

    trt: str
    hf: str | tuple[str, ...]
    rule: Rule
    transpose: bool = False
    when: Callable[[dict], bool] | None = None

    def sources(self) -> tuple[str, ...]:
        return self.hf if isinstance(self.hf, tuple) else (self.hf,)


def resolve_name(source: WeightSource, candidates: Sequence[str]) -> str | None:
    for name in candidates:
        if name in source:
            return name
    return None


class ArchSpec:
    """An architecture: HF config -> checkpoint config, expected tensors, and the conversion plan."""

    hf_architectures: tuple[str, ...] = ()
    trt_architectures: tuple[str, ...] = ()
    engine_layout: str | None = None  # the torch engine's layout id; None: no torch engine

    def block_specs(self, cfg: dict) -> ModelSpec:
        """The decoder as data (``models/spec.py``), from the checkpoint config."""
        raise UnsupportedArchitecture(f"{cfg.get('architecture')} has no block spec")

    def engine_weight_map(self, cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
        """(engine tensor, checkpoint tensors concatenated along dim 0), global layer indices."""
        raise UnsupportedArchitecture(f"{cfg.get('architecture')} has no engine weight map")

    def trt_config(self, hf: dict, dtype: str, mapping: Mapping) -> dict:
        raise NotImplementedError

    def check_mapping(self, cfg: dict, mapping: Mapping) -> None:
        """The dense rule: attention heads (and KV heads, duplicated if fewer) and the MLP's intermediate
        size split over tp, the layers over pp. Families with other parts (experts, per-layer configs)
        override it."""
        check_attention_split(cfg["num_attention_heads"], cfg["num_key_value_heads"], mapping.tp_size)
        check_divisible("intermediate_size", cfg["intermediate_size"], "tp_size", mapping.tp_size)
        mapping.stage_sizes(cfg["num_hidden_layers"])

    @overload
    def expected(self, cfg: dict, rank: int, dtype: None = None) -> list[TensorSpec]: ...
    @overload
    def expected(self, cfg: dict, rank: int, dtype: torch.dtype | str) -> list[RawTensorSpec]: ...
    def expected(self, cfg: dict, rank: int, dtype: torch.dtype | str | None = None
                 ) -> list[TensorSpec] | list[RawTensorSpec]:
        """(name, shape, dtype) of every tensor of ``rank``; ``dtype`` replaces the torch dtype of
        ``cfg["dtype"]`` (so a shape check need not import torch). Families write ``tensor_specs``."""
        dt = TORCH_DTYPES[cfg["dtype"]] if dtype is None else dtype
        return self.tensor_specs(cfg, rank, Mapping.from_dict(cfg["mapping"]), dt, shapes_only=dtype is not None)

    def tensor_specs(self, cfg: dict, rank: int, m: Mapping, dt: torch.dtype | str,
                     shapes_only: bool) -> list[RawTensorSpec]:
        """``expected`` of a family: ``m`` is ``cfg``'s mapping, ``dt`` the dtype of its tensors (the torch
        dtype of ``cfg["dtype"]``, or the caller's stand-in when ``shapes_only``)."""
        raise NotImplementedError

    def plan(self, cfg: dict, rank: int, source: WeightSource) -> list[TensorPlan]:
        raise NotImplementedError


def check_divisible(what: str, n: int, by_what: str, by: int, hint: str | None = None) -> None:
    if by and n % by:
        raise InvalidMapping(f"{what}={n} is not divisible by {by_what}={by}", hint=hint)


def check_attention_split(num_heads: int, num_kv: int, tp_size: int) -> None:
    check_divisible("num_attention_heads", num_heads, "tp_size", tp_size,
                    hint="choose a tp_size that divides the number of attention heads")
    if num_kv >= tp_size:
        check_divisible("num_key_value_heads", num_kv, "tp_size", tp_size)
    elif tp_size % num_kv:
        raise InvalidMapping(
            f"tp_size={tp_size} is not a multiple of num_key_value_heads={num_kv}, so KV heads "
            "cannot be duplicated evenly across ranks"
        )


class TableArch(ArchSpec):
    """An architecture described by weight tables; ``plan`` is generic over them."""

    # Alternative prefixes tried for HF names (checkpoints saved from the base model lack "model.").
    hf_prefix_aliases: tuple[tuple[str, str], ...] = ()

    def split_context(self, cfg: dict, tp_rank: int) -> SplitContext:
        return SplitContext(
            tp_rank=tp_rank,
            tp_size=cfg["mapping"]["tp_size"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_size=cfg.get("head_size") or cfg["hidden_size"] // cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
        )

    def layer_table(self, cfg: dict, layer: int) -> list[W]:
        raise NotImplementedError

    def global_table(self, cfg: dict, first_stage: bool, last_stage: bool, source: WeightSource) -> list[W]:
        raise NotImplementedError

    def _candidates(self, name: str) -> list[str]:
        out = [name]
        for a, b in self.hf_prefix_aliases:
            if name.startswith(a):
                out.append(b + name[len(a):])
        return out

    def _plan_entry(self, w: W, trt_name: str, ctx: SplitContext, dtype: torch.dtype | str,
                    source: WeightSource) -> TensorPlan:
        infos = []
        for hf in w.sources():
            resolved = resolve_name(source, self._candidates(hf))
            if resolved is None:
                raise WeightsMismatch(
                    f"tensor {hf!r} (needed for {trt_name!r}) is missing from the weights",
                    hint="the weights do not match config.json, or the snapshot is incomplete",
                )
            infos.append(source.info(resolved))
        pieces = w.rule(ctx, infos, w.transpose)
        rows = sum(p.nrows for p in pieces)
        widths = {p.ncols for p in pieces}
        if len(widths) != 1:
            raise WeightsMismatch(f"sources of {trt_name!r} have different widths {sorted(widths)}")
        width = widths.pop()
        shape = (rows,) if width == 0 else (rows, width)
        return TensorPlan(trt_name, shape, dtype, pieces)

    def plan(self, cfg: dict, rank: int, source: WeightSource) -> list[TensorPlan]:
        mapping = Mapping.from_dict(cfg["mapping"])
        dtype = source.output_dtype(cfg["dtype"])
        ctx = self.split_context(cfg, mapping.tp_rank(rank))
        plans: list[TensorPlan] = []
        first, last = mapping.is_first_pp_rank(rank), mapping.is_last_pp_rank(rank)
        layers = mapping.pp_layers(cfg["num_hidden_layers"], mapping.pp_rank(rank))
        globals_ = self.global_table(cfg, first, last, source)
        head = [w for w in globals_ if not w.trt.startswith(("transformer.ln_f", "lm_head"))]
        tail = [w for w in globals_ if w.trt.startswith(("transformer.ln_f", "lm_head"))]
        for w in head:
            plans.append(self._plan_entry(w, w.trt, ctx, dtype, source))
        for local, layer in enumerate(layers):
            for w in self.layer_table(cfg, layer):
                if w.when is not None and not w.when(cfg):
                    continue
                plans.append(self._plan_entry(w, f"transformer.layers.{local}.{w.trt}", ctx, dtype, source))
        for w in tail:
            plans.append(self._plan_entry(w, w.trt, ctx, dtype, source))
        self._check_against_expected(cfg, rank, plans, dtype)
        return plans

    def _check_against_expected(self, cfg: dict, rank: int, plans: list[TensorPlan],
                                dtype: torch.dtype | str | None = None) -> None:
        expected = {n: s for n, s, _ in self.expected(cfg, rank, dtype=dtype)}
        got = {p.name: p.shape for p in plans}
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(n for n in set(got) & set(expected) if tuple(got[n]) != tuple(expected[n]))
        if missing or extra or wrong:
            parts = []
            if wrong:
                parts.append("shape mismatch: " + ", ".join(
                    f"{n} weights give {list(got[n])}, config implies {list(expected[n])}" for n in wrong[:5]))
            if missing:
                parts.append("not produced: " + ", ".join(missing[:5]))
            if extra:
                parts.append("unexpected: " + ", ".join(extra[:5]))
            raise WeightsMismatch(f"rank {rank}: weights do not match config.json ({'; '.join(parts)})")

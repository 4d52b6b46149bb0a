"""Mapping: TensorRT-LLM's rank arithmetic for tensor x pipeline parallelism.

rank = pp_rank * tp_size + tp_rank (no context parallelism); pipeline stages own contiguous,
equally sized layer ranges (TensorRT-LLM's even split; ``layers_per_stage`` can override it for
Kiln's own engine, e.g. the cost-balanced split of heterogeneous models).

Mixture-of-Experts layers split their experts over the tp ranks as TensorRT-LLM's ``Mapping`` does:
tp_size = moe_tp_size x moe_ep_size, moe_tp_rank = tp_rank // moe_ep_size (each expert's
intermediate dim is cut in moe_tp_size slices), moe_ep_rank = tp_rank % moe_ep_size (rank holds the
contiguous experts ``ep_experts``). Unset (None, TensorRT-LLM's -1): moe_tp_size = tp_size, moe_ep_size = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidMapping


@dataclass(frozen=True)
class Mapping:
    tp_size: int = 1
    pp_size: int = 1
    # Optional explicit layer count per pipeline stage (sums to num_layers); None = even split.
    layers_per_stage: tuple[int, ...] | None = field(default=None)
    moe_tp_size: int | None = None  # None: tp_size // moe_ep_size
    moe_ep_size: int | None = None  # None: tp_size // moe_tp_size (1 when both are unset)

    def __post_init__(self) -> None:
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise InvalidMapping(f"tp_size must be a positive integer, got {self.tp_size!r}")
        if not isinstance(self.pp_size, int) or self.pp_size < 1:
            raise InvalidMapping(f"pp_size must be a positive integer, got {self.pp_size!r}")
        if self.layers_per_stage is not None:
            if len(self.layers_per_stage) != self.pp_size or any(n < 1 for n in self.layers_per_stage):
                raise InvalidMapping(
                    f"layers_per_stage {list(self.layers_per_stage)} must have pp_size={self.pp_size} "
                    "positive entries"
                )
        for name in ("moe_tp_size", "moe_ep_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InvalidMapping(f"{name} must be a positive integer, got {v!r}")
        if self.moe_tp_size is None and self.moe_ep_size is not None and self.tp_size % self.moe_ep_size:
            raise InvalidMapping(f"tp_size={self.tp_size} is not divisible by moe_ep_size={self.moe_ep_size}",
                                 hint="expert parallelism splits the experts inside the tp ranks")
        if self.moe_tp * self.moe_ep != self.tp_size:
            raise InvalidMapping(
                f"tp_size={self.tp_size} must equal moe_tp_size={self.moe_tp} x moe_ep_size={self.moe_ep}",
                hint="choose moe_ep_size (and moe_tp_size) whose product is tp_size",
            )

    @property
    def has_moe_split(self) -> bool:
        """moe_tp_size / moe_ep_size were given (and are written to the checkpoint)."""
        return self.moe_tp_size is not None or self.moe_ep_size is not None

    @property
    def moe_ep(self) -> int:
        if self.moe_ep_size is not None:
            return self.moe_ep_size
        return self.tp_size // self.moe_tp_size if self.moe_tp_size else 1

    @property
    def moe_tp(self) -> int:
        if self.moe_tp_size is not None:
            return self.moe_tp_size
        return self.tp_size // self.moe_ep if self.moe_ep_size else self.tp_size

    def moe_tp_rank(self, rank: int) -> int:
        return self.tp_rank(rank) // self.moe_ep

    def moe_ep_rank(self, rank: int) -> int:
        return self.tp_rank(rank) % self.moe_ep

    def ep_experts(self, num_experts: int, rank: int) -> range:
        """The experts ``rank`` holds (TensorRT-LLM's ``Mapping.ep_experts``: a contiguous range)."""
        per = num_experts // self.moe_ep
        return range(self.moe_ep_rank(rank) * per, (self.moe_ep_rank(rank) + 1) * per)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp_size

    def pp_rank(self, rank: int) -> int:
        return rank // self.tp_size

    def ranks(self) -> range:
        return range(self.world_size)

    def stage_sizes(self, num_layers: int) -> list[int]:
        if self.layers_per_stage is not None:
            if sum(self.layers_per_stage) != num_layers:
                raise InvalidMapping(
                    f"layers_per_stage {list(self.layers_per_stage)} sums to {sum(self.layers_per_stage)}, "
                    f"but the model has num_hidden_layers={num_layers}"
                )
            return list(self.layers_per_stage)
        if num_layers % self.pp_size != 0:
            raise InvalidMapping(
                f"num_hidden_layers={num_layers} is not divisible by pp_size={self.pp_size}",
                hint="choose a pp_size that divides the layer count",
            )
        return [num_layers // self.pp_size] * self.pp_size

    def pp_layers(self, num_layers: int, pp_rank: int) -> list[int]:
        """Global indices of the layers owned by pipeline stage ``pp_rank``."""
        sizes = self.stage_sizes(num_layers)
        start = sum(sizes[:pp_rank])
        return list(range(start, start + sizes[pp_rank]))

    def is_first_pp_rank(self, rank: int) -> bool:
        return self.pp_rank(rank) == 0

    def is_last_pp_rank(self, rank: int) -> bool:
        return self.pp_rank(rank) == self.pp_size - 1

    def config_dict(self, num_layers: int) -> dict:
        """The checkpoint's ``mapping``: the minimal keys, plus Kiln's ``layers_per_stage`` only when
        the split is uneven (TensorRT-LLM's ``Mapping(**d)`` rejects unknown keys, and cannot run
        uneven stages anyway)."""
        d: dict = self.to_dict()
        sizes = self.stage_sizes(num_layers)
        if self.layers_per_stage is not None and len(set(sizes)) > 1:
            d["layers_per_stage"] = sizes
        return d

    def to_dict(self) -> dict[str, int]:
        # Minimal keys: newer Mapping keys crash older TensorRT-LLM's Mapping(**d); the MoE split only
        # when given (a TensorRT-LLM that splits experts knows moe_tp_size / moe_ep_size).
        d = {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}
        if self.has_moe_split:
            d.update(moe_tp_size=self.moe_tp, moe_ep_size=self.moe_ep)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Mapping:
        tp = int(d.get("tp_size", 1))
        pp = int(d.get("pp_size", 1))
        ws = int(d.get("world_size", tp * pp))
        if ws != tp * pp:
            raise InvalidMapping(f"mapping world_size={ws} != tp_size={tp} x pp_size={pp}")
        lps = d.get("layers_per_stage")
        moe = {k: (None if int(d[k]) == -1 else int(d[k])) for k in ("moe_tp_size", "moe_ep_size")
               if d.get(k) is not None}
        return cls(tp_size=tp, pp_size=pp, layers_per_stage=tuple(lps) if lps else None, **moe)

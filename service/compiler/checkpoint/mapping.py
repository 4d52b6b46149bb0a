"""Mapping: TensorRT-LLM's rank arithmetic for tensor x pipeline parallelism.

rank = pp_rank * tp_size + tp_rank (no context parallelism); pipeline stages own contiguous,
equally sized layer ranges (TensorRT-LLM's even split; ``layers_per_stage`` can override it for
Kiln's own engine, e.g. the cost-balanced split of heterogeneous models).
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
        # Minimal keys: newer Mapping keys crash older TensorRT-LLM's Mapping(**d).
        return {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}

    @classmethod
    def from_dict(cls, d: dict) -> Mapping:
        tp = int(d.get("tp_size", 1))
        pp = int(d.get("pp_size", 1))
        ws = int(d.get("world_size", tp * pp))
        if ws != tp * pp:
            raise InvalidMapping(f"mapping world_size={ws} != tp_size={tp} x pp_size={pp}")
        lps = d.get("layers_per_stage")
        return cls(tp_size=tp, pp_size=pp, layers_per_stage=tuple(lps) if lps else None)

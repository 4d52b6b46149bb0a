"""HF folder -> TensorRT-LLM checkpoint, streamed: ``from_hugging_face(...).save_checkpoint(out)``.

Everything that can fail is checked before the first byte is written (architecture, config
fields, tp/pp split, every safetensors header, the full per-rank plan against the expected
names and shapes). Then each output tensor is produced in bounded row chunks from memory-mapped
source slices and written at its precomputed offset, on ``workers`` threads. The output
directory is assembled under a temporary name and renamed into place only when complete.

Torch-free fast path (``convert_checkpoint(torch_free=True)``, the default, so ``kiln convert``):
the plan is first built over a ``RawSafetensorsSource`` (dtypes as safetensors codes). When every
piece's source dtype already is the output dtype, conversion is pure byte movement -- verbatim
ranges by ``copy_file_range``, everything else (column slices of row-parallel weights, Conv1D
transposes, lm_head zero rows) as numpy views of same-width unsigned integers over the memory map
-- and torch is never imported. Otherwise (a cast, pickle weights) the same files are re-planned
over the ordinary torch source. Both routes write byte-identical files; every check runs the same.

    python -m service.cli convert ./SmolLM2-135M ./ckpt --dtype bfloat16 --tp-size 3
"""

from __future__ import annotations

import os
import resource
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint.mapping import Mapping
from .checkpoint.safetensors_io import DTYPES, RAW_NP, SafetensorsWriter, dtype_name, itemsize, publish_dir
from .errors import InvalidArgument, InvalidMapping, KilnError, ModelNotFound, OutputExists
from .models import spec_for_hf
from .models.base import ArchSpec, Piece, TensorPlan
from .models.hf_config import resolve_dtype
from .models.moe import MOE
from .sources.layout import detect_layout, model_config, open_model
from .sources.weights import RawSafetensorsSource, WeightSource
from .version import __version__

if TYPE_CHECKING:
    import torch

ProgressFn = Callable[[float, str], None]
CHUNK_BYTES = 64 << 20
KERNEL_COPY = True  # copy verbatim byte ranges with copy_file_range (False: always through the mmap)


@dataclass
class ConvertSummary:
    out_dir: str
    architecture: str
    dtype: str
    tp_size: int
    pp_size: int
    tensors: int
    bytes: int
    seconds: float
    peak_rss_bytes: int
    # pp > 1: the split used and the per-stage cost of the even and the cost-balanced split
    pipeline_split: dict | None = None
    # the torch-free route ran (no cast needed: bytes moved without importing torch)
    torch_free: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        text = (
            f"converted {self.architecture} -> {self.out_dir}: {self.tensors} tensors, "
            f"{self.bytes / 1e9:.2f} GB, {self.seconds:.1f} s "
            f"({self.bytes / 1e9 / max(self.seconds, 1e-9):.2f} GB/s), peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )
        if self.pipeline_split:
            from .checkpoint.pipeline_split import format_split

            text += "\n" + format_split(self.pipeline_split)
        return text


def _split_report(config: dict, mapping: Mapping) -> dict | None:
    """The per-stage cost of the split used and of both candidate splits (pp > 1 only)."""
    if mapping.pp_size == 1:
        return None
    if config.get("kiln_pipeline_split"):
        return config["kiln_pipeline_split"]
    if "rope" not in str(config.get("position_embedding_type", "")):
        return None  # the cost model prices Llama-style layers
    from .checkpoint.pipeline_split import split_record

    return split_record(config, mapping)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class HFCheckpointModel:
    """A converted model that exists only as a plan over memory-mapped source weights."""

    def __init__(self, model_dir: Path, spec: ArchSpec, config: dict, source: WeightSource,
                 write_extras: Callable[[Path], list[str]] | None = None):
        self.model_dir = model_dir
        self.write_extras = write_extras  # files written next to config.json (a GGUF's tokenizer)
        self.spec = spec
        self.config = config
        self.mapping = Mapping.from_dict(config["mapping"])
        self.source = source
        self._plans = {rank: spec.plan(config, rank, source) for rank in self.mapping.ranks()}

    def plans(self, rank: int) -> list[TensorPlan]:
        return self._plans[rank]

    @property
    def torch_free(self) -> bool:
        """Plans over a raw source: executed by moving bytes, without torch."""
        return isinstance(self.source, RawSafetensorsSource)

    def moves_bytes_only(self) -> bool:
        """Every piece reads a source already in the output dtype (no cast anywhere)."""
        return all(
            piece.source is None or (self.source.info(piece.source).dtype == plan.dtype and not piece.add)
            for plans in self._plans.values() for plan in plans for piece in plan.pieces
        )

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for plans in self._plans.values() for p in plans)

    def tensors(self, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Materialize one output tensor at a time (for in-memory consumers such as the quantizer)."""
        import torch

        for plan in self._plans[rank]:
            dtype = DTYPES[plan.dtype] if isinstance(plan.dtype, str) else plan.dtype
            out = torch.empty(plan.shape, dtype=dtype)
            flat = out.view(-1).view(torch.uint8)
            for offset, chunk in produce_chunks(plan, self.source):
                if isinstance(chunk, np.ndarray):
                    raw = torch.from_numpy(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
                else:
                    raw = chunk.contiguous().view(-1).view(torch.uint8)
                flat[offset:offset + raw.numel()] = raw
            yield plan.name, out

    def save_checkpoint(self, out_dir: str | os.PathLike, *, overwrite: bool = False,
                        progress: ProgressFn | None = None, workers: int = 2) -> ConvertSummary:
        return write_checkpoint(self, Path(out_dir), overwrite=overwrite, progress=progress, workers=workers)

    def close(self) -> None:
        self.source.close()


def _plan_config(hf: dict, dtype: str, mapping: Mapping) -> tuple[ArchSpec, dict]:
    """The family and the checkpoint config of an HF config dict, with every check that needs no weights."""
    spec = spec_for_hf(hf)
    if mapping.moe_ep > 1 and spec is not MOE:
        raise InvalidMapping(f"moe_ep_size={mapping.moe_ep} splits experts, but {hf['architectures'][0]} has none",
                             hint="expert parallelism applies to Mixture-of-Experts models only")
    try:
        cfg = spec.trt_config(hf, resolve_dtype(dtype, hf), mapping)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # a required field missing or null
        nulls = ", ".join(f"{k}=null" for k, v in hf.items() if v is None)
        what = (f"field {exc.args[0]!r} is missing" if isinstance(exc, KeyError)
                else f"a field is null or invalid ({nulls or exc})")
        raise InvalidArgument(f"config.json of {hf['architectures'][0]}: {what}"[:300],
                              hint="config.json is not a complete model configuration: use the model's published "
                              "config") from exc
    if "layer_configs" in cfg:  # per-layer configs (Nemotron-NAS): the checkpoint records its split's cost
        from .checkpoint.pipeline_split import split_record

        cfg["kiln_pipeline_split"] = split_record(cfg, mapping)
    spec.check_mapping(cfg, mapping)
    return spec, cfg


def from_hugging_face(model_dir: str | os.PathLike, dtype: str = "auto", mapping: Mapping | None = None,
                      *, allow_pickle: bool = False, torch_free: bool = False) -> HFCheckpointModel:
    """Read config and weight headers, check the split, and plan every rank; reads no tensor data.

    ``model_dir`` is an HF folder, a Meta consolidated folder (``params.json`` + ``consolidated.NN.pth``,
    as TensorRT-LLM's ``from_meta_ckpt``) or a ``.gguf`` file (``sources/layout.py`` tells them apart).
    ``torch_free``: plan over a raw source and keep it when no piece needs a cast (the model then
    moves bytes without importing torch; ``tensors()`` still works, importing torch); otherwise, or
    for pickle weights, the ordinary torch source is used.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelNotFound(f"model folder not found: {model_dir}")
    mapping = mapping or Mapping()
    planned = None
    if detect_layout(model_dir) == "hf":  # config errors before any weight file is opened
        planned = _plan_config(model_config(model_dir), dtype, mapping)
    opened = open_model(model_dir, allow_pickle=allow_pickle, raw=torch_free)
    source = opened.source
    try:
        spec, cfg = planned or _plan_config(opened.hf_config, dtype, mapping)
        model = HFCheckpointModel(model_dir, spec, cfg, source, opened.write_extras)
        if isinstance(source, RawSafetensorsSource) and not model.moves_bytes_only():
            source = source.torch_source()  # same opened files, torch dtypes: re-plan for the cast
            model = HFCheckpointModel(model_dir, spec, cfg, source, opened.write_extras)
        return model
    except BaseException:
        source.close()
        raise


def _piece_chunks(plan: TensorPlan, piece: Piece, source: WeightSource, step: int) -> Iterator[torch.Tensor]:
    """The rows of one piece, ``step`` rows at a time, cast to the output dtype."""
    import torch

    dtype = plan.dtype
    assert not isinstance(dtype, str)  # _chunks_of sends plans over raw sources to _raw_piece_chunks
    width = plan.shape[-1] if len(plan.shape) >= 2 else 1  # 3-D: stacked experts
    if piece.source is None:  # zero rows (vocab padding)
        for r in range(0, piece.nrows, step):
            n = min(step, piece.nrows - r)
            yield torch.zeros((n, width) if len(plan.shape) >= 2 else (n,), dtype=dtype)
        return
    view = source.view(piece.source)
    if view.dim() == 1:
        rows = view[piece.rows[0]:piece.rows[1]]
        yield (rows.float() + piece.add).to(dtype) if piece.add else rows.to(dtype)
        source.release(piece.source)
        return
    mat = view.t() if piece.transpose else view
    c0, c1 = piece.cols if piece.cols is not None else (0, mat.shape[1])
    r0, r1 = piece.rows
    for r in range(r0, r1, step):
        r2 = min(r + step, r1)
        yield mat[r:r2, c0:c1].to(dtype)
        if not piece.transpose:
            source.release(piece.source, r, r2)
    if piece.transpose:
        source.release(piece.source)


def _raw_piece_chunks(plan: TensorPlan, piece: Piece, source: WeightSource, step: int) -> Iterator[np.ndarray]:
    """``_piece_chunks`` for a plan over a raw source: the same rows as numpy views of same-width
    unsigned integers (the source already holds the output dtype, so nothing is cast)."""
    width = plan.shape[-1] if len(plan.shape) >= 2 else 1  # 3-D: stacked experts
    raw_dt = RAW_NP[itemsize(plan.dtype)]
    if piece.source is None:  # zero rows (vocab padding)
        for r in range(0, piece.nrows, step):
            n = min(step, piece.nrows - r)
            yield np.zeros((n, width) if len(plan.shape) >= 2 else (n,), dtype=raw_dt)
        return
    src_dtype = source.info(piece.source).dtype
    if src_dtype != plan.dtype or piece.add:  # from_hugging_face never builds such a raw plan
        raise RuntimeError(f"{plan.name}: raw plan reads {piece.source!r} as {src_dtype}, not {plan.dtype}")
    view = source.raw(piece.source)
    if view.ndim == 1:
        yield view[piece.rows[0]:piece.rows[1]]
        source.release(piece.source)
        return
    mat = view.T if piece.transpose else view
    c0, c1 = piece.cols if piece.cols is not None else (0, mat.shape[1])
    r0, r1 = piece.rows
    for r in range(r0, r1, step):
        r2 = min(r + step, r1)
        yield mat[r:r2, c0:c1]
        if not piece.transpose:
            source.release(piece.source, r, r2)
    if piece.transpose:
        source.release(piece.source)


def _chunks_of(plan: TensorPlan) -> Callable[[TensorPlan, Piece, WeightSource, int], Iterator]:
    return _raw_piece_chunks if isinstance(plan.dtype, str) else _piece_chunks


def _step(plan: TensorPlan, chunk_bytes: int) -> int:
    elt = itemsize(plan.dtype)
    width = plan.shape[-1] if len(plan.shape) >= 2 else 1  # 3-D: stacked experts
    return max(1, chunk_bytes // max(width * elt, 1))


def produce_chunks(plan: TensorPlan, source: WeightSource,
                   chunk_bytes: int | None = None) -> Iterator[tuple[int, torch.Tensor | np.ndarray]]:
    """Yield (byte offset inside the output tensor, chunk in the output dtype), in order (numpy
    arrays of the raw elements for a plan over a raw source)."""
    step = _step(plan, chunk_bytes or CHUNK_BYTES)
    chunks = _chunks_of(plan)
    offset = 0
    for piece in plan.pieces:
        for chunk in chunks(plan, piece, source, step):
            yield offset, chunk
            offset += chunk.nbytes if isinstance(chunk, np.ndarray) else chunk.numel() * chunk.element_size()


def _piece_nbytes(plan: TensorPlan, piece: Piece) -> int:
    elt = itemsize(plan.dtype)
    return piece.nrows * max(piece.ncols, 1) * elt


def _byte_identical(plan: TensorPlan, piece: Piece, source: WeightSource) -> tuple[int, int, int] | None:
    """Where a piece is a verbatim byte range of its source (same dtype, whole rows), its span."""
    if piece.source is None or piece.transpose or piece.cols is not None or piece.add:
        return None
    if source.info(piece.source).dtype != plan.dtype:
        return None
    return source.byte_span(piece.source, piece.rows[0], piece.rows[1])


def write_plan(plan: TensorPlan, source: WeightSource, writer: SafetensorsWriter,
               advance: Callable[[int, str], None] | None = None, *, kernel_copy: bool = True) -> None:
    """Write one output tensor: verbatim byte ranges are copied in the kernel (copy_file_range, no
    page ever mapped into this process); everything else is sliced from the memory map, cast and
    written chunk by chunk (over a raw source: sliced as numpy views, never cast)."""
    chunk_bytes = CHUNK_BYTES
    step = _step(plan, chunk_bytes)
    chunks = _chunks_of(plan)
    offset = 0
    for piece in plan.pieces:
        span = _byte_identical(plan, piece, source) if kernel_copy else None
        if span is not None:
            fd, start, length = span
            for pos in range(0, length, chunk_bytes):
                n = min(chunk_bytes, length - pos)
                try:
                    writer.copy_from(plan.name, offset + pos, fd, start + pos, n)
                except OSError:  # filesystem without copy_file_range: fall back to the mmap path
                    span = None
                    break
                if advance:
                    advance(n, plan.name)
            if span is not None:
                offset += length
                continue
            # fallback: redo this piece from its first byte through the memory map
        for chunk in chunks(plan, piece, source, step):
            n = writer.write(plan.name, offset, chunk)
            offset += n
            if advance:
                advance(n, plan.name)


def _temp_sibling(out_dir: Path, tag: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{tag}-{uuid.uuid4().hex[:12]}"


def write_checkpoint(model: HFCheckpointModel, out_dir: Path, *, overwrite: bool = False,
                     progress: ProgressFn | None = None, workers: int = 2) -> ConvertSummary:
    """Stream every rank's tensors into ``out_dir`` atomically (temp dir + rename)."""
    out_dir = out_dir.absolute()
    if out_dir.exists() and not overwrite:
        raise OutputExists(f"output directory already exists: {out_dir}")
    if not out_dir.parent.is_dir():
        raise InvalidArgument(f"parent directory of the output does not exist: {out_dir.parent}")
    start = time.perf_counter()
    total = model.total_bytes
    done = 0
    lock = threading.Lock()
    last_report = [-1.0]

    def advance(n: int, what: str) -> None:
        nonlocal done
        with lock:
            done += n
            frac = done / total if total else 1.0
            if progress is not None and (frac - last_report[0] >= 0.005 or frac >= 1.0):
                last_report[0] = frac
                progress(frac, what)

    tmp = _temp_sibling(out_dir, "tmp")
    tmp.mkdir()
    try:
        config = dict(model.config)
        (tmp / "config.json").write_text(_dump_json(config))
        writers = {}
        jobs: list[tuple[SafetensorsWriter, TensorPlan, int]] = []
        world = model.mapping.world_size
        for rank in model.mapping.ranks():
            plans = model.plans(rank)
            w = SafetensorsWriter(
                tmp / f"rank{rank}.safetensors",
                [(p.name, dtype_name(p.dtype), p.shape) for p in plans],
                metadata={"format": "pt", "producer": f"kiln {__version__}"},
            )
            writers[rank] = w
            jobs += [(w, p, rank) for p in plans]

        def run(job: tuple[SafetensorsWriter, TensorPlan, int]) -> None:
            writer, plan, rank = job
            # a split checkpoint's messages say which rank file is being written ("rank 1/4 <tensor>")
            step = advance if world == 1 else (lambda n, what: advance(n, f"rank {rank}/{world} {what}"))
            write_plan(plan, model.source, writer, step, kernel_copy=KERNEL_COPY)

        try:
            if workers > 1:
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-convert") as pool:
                    for _ in pool.map(run, jobs):
                        pass
            else:
                for job in jobs:
                    run(job)
        finally:
            for w in writers.values():
                w.close(fsync=True)
        if model.write_extras is not None:
            model.write_extras(tmp)
        publish_dir(tmp, out_dir)  # overwrite: the old one is swapped out only once the new one is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_tensors = sum(len(model.plans(r)) for r in model.mapping.ranks())
    return ConvertSummary(
        out_dir=str(out_dir),
        architecture=model.config["architecture"],
        dtype=model.config["dtype"],
        tp_size=model.mapping.tp_size,
        pp_size=model.mapping.pp_size,
        tensors=n_tensors,
        bytes=total,
        seconds=time.perf_counter() - start,
        peak_rss_bytes=peak_rss_bytes(),
        pipeline_split=_split_report(model.config, model.mapping),
        torch_free=model.torch_free,
    )


def _dump_json(obj: dict) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def convert_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "auto",
                       mapping: Mapping | None = None, allow_pickle: bool = False, overwrite: bool = False,
                       progress: ProgressFn | None = None, workers: int = 2, torch_free: bool = True) -> ConvertSummary:
    """The convert stage: a typed function from paths and a config to a summary (see module doc).

    ``torch_free`` (default): when no tensor needs a cast, move bytes without importing torch;
    ``False`` always takes the torch route. The output is the same byte for byte.
    """
    model = from_hugging_face(model_dir, dtype=dtype, mapping=mapping, allow_pickle=allow_pickle,
                              torch_free=torch_free)
    try:
        return model.save_checkpoint(out_dir, overwrite=overwrite, progress=progress, workers=workers)
    finally:
        model.close()


def preflight(model_dir: str | os.PathLike, dtype: str = "auto", mapping: Mapping | None = None,
              *, allow_pickle: bool = False) -> dict:
    """Every check ``convert_checkpoint`` makes before writing, and the checkpoint config it would write."""
    model = from_hugging_face(model_dir, dtype=dtype, mapping=mapping, allow_pickle=allow_pickle)
    try:
        return dict(model.config)
    finally:
        model.close()


__all__ = [
    "ConvertSummary",
    "HFCheckpointModel",
    "KilnError",
    "convert_checkpoint",
    "from_hugging_face",
    "preflight",
    "produce_chunks",
]

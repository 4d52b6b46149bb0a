"""Engine runtime: load a ``torch``-backend engine directory and generate, on GPU or CPU.

    engine = Engine.load("./engine")                       # GPU if the engine was built for one
    out = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)          # greedy
    out = engine.generate(["Hello"], 32, SamplingConfig(temperature=0.8, top_p=0.9, seed=0))
    out.tokens, out.texts, out.stats                       # new tokens per prompt, timings

On GPU the engine compiles its step functions with torch.compile against the Inductor/Triton cache
shipped in the engine directory (so a fresh process does not compile from scratch) and captures the
decode step, greedy selection included, in one CUDA graph per batch-size bucket. Prompts are batched
up to ``max_batch_size``; prompt and generation limits are those of the build.

    python -m service.compiler.engine.engine warmup ENGINE_DIR   # compile + capture (used by build)
    python -m service.compiler.engine.engine generate ENGINE_DIR --ids 1,2,3 --max-new-tokens 16
    kiln build CKPT ENGINE_DIR ...; kiln generate ENGINE_DIR --prompt "..."   # the same through the CLI
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgument, InvalidCheckpoint, KilnError
from .cli_args import add_generate_arguments
from .model import ENGINE_LAYOUTS, EngineModel
from .ranks import add_rank_arguments, exit_rank, join_group, leave_group
from .weights import load_weights

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Short prefills replayed from CUDA graphs (on by default, see Engine.set_prefill_graphs): prompt lengths are
# padded up to one of these, batches to the decode buckets, while batch x length stays within the cap
PREFILL_GRAPH_LENGTHS = (16, 32, 64, 128, 256, 512)
PREFILL_GRAPH_TOKENS = 512


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # generation stops after it (it is kept)


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens, per prompt
    texts: list[str] | None = None
    stats: dict = field(default_factory=dict)


def _buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def _kv_buckets(max_seq: int) -> list[int]:
    """Attention spans for decode: powers of two from 256, then max_seq_len itself."""
    out, k = [], 256
    while k < max_seq:
        out.append(k)
        k *= 2
    return out + [max_seq]


def _sm_tag() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major * 10 + minor}"


def _use_compile_cache(engine_dir: Path) -> str | None:
    """Point Inductor (and Triton, beneath it) at the cache shipped for this GPU's arch, if any."""
    cache = engine_dir / "compile_cache" / _sm_tag()
    if not cache.is_dir():
        return None
    if not os.access(cache, os.W_OK):  # Inductor writes lock files next to its entries
        copy = Path(tempfile.mkdtemp(prefix="kiln-inductor-")) / cache.name
        shutil.copytree(cache, copy)
        cache = copy
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    os.environ.pop("TRITON_CACHE_DIR", None)  # Triton's cache then lives under Inductor's
    return str(cache)


class Engine:
    def __init__(self, engine_dir: Path, config: dict, model: EngineModel, *,
                 use_graphs: bool, tokenizer=None):
        self.engine_dir, self.config, self.model = engine_dir, config, model
        self.build_config = config["build_config"]
        self.max_batch = int(self.build_config["max_batch_size"])
        self.max_seq = int(self.build_config["max_seq_len"])
        self.max_input = int(self.build_config["max_input_len"])
        self.max_num_tokens = int(self.build_config["max_num_tokens"])
        self.device = model.device
        self.tokenizer = tokenizer
        self.use_graphs = use_graphs
        self.ids_buf = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        self.pos_buf = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None  # a torch.cuda.graph_pool_handle(), shared by the captured graphs
        # prefill buckets: tokens per bucketed prefill (0 = off), and (batch, length) -> graph, inputs, logits
        self.prefill_graph_tokens = 0
        self._prefill_graphs: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.load_stats: dict = {}

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, engine_dir: str | os.PathLike, *, device: str | None = None, compile: bool | None = None,
             cuda_graphs: bool | None = None, tokenizer=None, warmup: bool = False,
             prefill_graphs: bool | None = None) -> Engine:
        """Load weights and set up compilation against the shipped cache. Graphs are compiled (from
        the cache) and captured on first use; ``warmup=True`` does every bucket now (what build runs).
        ``prefill_graphs`` (default on; ``KILN_PREFILL_GRAPHS=0`` in the environment turns the default
        off) replays short prefills from CUDA graphs too; see ``set_prefill_graphs``."""
        start = time.perf_counter()
        engine_dir = Path(engine_dir)
        try:
            config = json.loads((engine_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise InvalidCheckpoint(f"{engine_dir} is not an engine directory: {exc}") from exc
        layout = config.get("engine", {}).get("layout")
        if config.get("backend") != "torch" or layout not in ENGINE_LAYOUTS:
            raise InvalidCheckpoint(
                f"{engine_dir} holds a {config.get('backend')!r} engine with layout {layout!r}; "
                f"Engine runs torch engines of layout {', '.join(ENGINE_LAYOUTS)}"
            )
        from ..models import spec_for_checkpoint

        arch = config.get("pretrained_config", {}).get("architecture")
        want = spec_for_checkpoint(config.get("pretrained_config", {})).engine_layout
        if want != layout:
            raise InvalidCheckpoint(f"{engine_dir} holds a {arch} engine of layout {layout!r}, but {arch} engines "
                                    f"have layout {want!r}", hint="rebuild the engine from its checkpoint")
        bc = config["build_config"]
        if device is None:
            device = "cuda" if torch.cuda.is_available() and config["engine"]["arch"] != "cpu" else "cpu"
        on_gpu = torch.device(device).type == "cuda"
        if compile is None:
            compile = bool(bc.get("compile", True)) if on_gpu else bool(bc.get("compile_on_cpu", False))
        cache = _use_compile_cache(engine_dir) if (on_gpu and compile) else None
        tp = int(config["engine"].get("tp_size", 1))
        group, rank = None, 0
        if tp > 1:  # one process per rank, inside an initialized process group of exactly tp ranks
            import torch.distributed as dist

            if not dist.is_initialized() or dist.get_world_size() != tp:
                raise InvalidArgument(
                    f"{engine_dir} is a tp={tp} engine: load it in each of {tp} processes after "
                    "torch.distributed.init_process_group (nccl on GPU, gloo on CPU)")
            group, rank = dist.group.WORLD, dist.get_rank()
            if on_gpu and device == "cuda":
                device = f"cuda:{rank % torch.cuda.device_count()}"
                torch.cuda.set_device(device)
        weights = load_weights(engine_dir / f"rank{rank}.safetensors", device)  # validated header, parallel reads
        weights_s = time.perf_counter() - start
        model = EngineModel(config["pretrained_config"], weights, max_batch=int(bc["max_batch_size"]),
                            max_seq=int(bc["max_seq_len"]), tp_group=group, tp_size=tp)
        model_s = time.perf_counter() - start - weights_s
        if compile:
            import torch._inductor.config as inductor_config

            # Kernels of a graph-cache hit are loaded through the autotune cache (one stored best
            # config each), not as the graph cache's bundled multi-config launchers, which torch 2.11
            # benchmarks again in every fresh process. Part of the cache key: build and load agree.
            inductor_config.bundle_triton_into_fx_graph_cache = False
            if cache and not warmup and os.environ.get("KILN_COMPILE_THREADS") is None:
                # Loading from the shipped cache: kernels load in this process; a pool of compile
                # workers (each importing torch) would cost a fresh process seconds before its first
                # token. Not part of the cache key. (The build's warmup compiles in parallel.)
                inductor_config.compile_threads = 1
            elif os.environ.get("KILN_COMPILE_THREADS"):
                inductor_config.compile_threads = int(os.environ["KILN_COMPILE_THREADS"])
            model.compile(bc.get("compile_mode"), bc.get("compile_options"))
        compile_setup_s = time.perf_counter() - start - weights_s - model_s
        use_graphs = on_gpu and (bc.get("use_cuda_graph", True) if cuda_graphs is None else cuda_graphs)
        if tokenizer is None and config["engine"].get("tokenizer_files"):
            tokenizer = _load_tokenizer(engine_dir)
        engine = cls(engine_dir, config, model, use_graphs=use_graphs, tokenizer=tokenizer)
        if prefill_graphs is None:
            prefill_graphs = os.environ.get("KILN_PREFILL_GRAPHS", "1") != "0"
        if prefill_graphs and use_graphs:
            engine.set_prefill_graphs(True)
        if warmup and on_gpu:
            engine.warmup()
        engine.load_stats = {"weights_seconds": round(weights_s, 3), "model_seconds": round(model_s, 3),
                             "compile_setup_seconds": round(compile_setup_s, 3), "compile_cache": cache,
                             "load_seconds": round(time.perf_counter() - start, 3)}
        return engine

    def set_prefill_graphs(self, on: bool, tokens: int = PREFILL_GRAPH_TOKENS) -> bool:
        """Replay prefills of at most ``tokens`` (padded batch x padded length) from CUDA graphs, one per
        (batch bucket, PREFILL_GRAPH_LENGTHS) pair, captured on first use: a short prompt's prefill is
        otherwise 32 layers of launches from Python (8B on an H200, 128-token prompt: TTFT 6.3 ms
        instead of 20-32 ms, ``benchmarks/ab_decode.py``). On by default where CUDA graphs are; the first
        prompt of each bucket pays for its capture. Tensor-parallel and Mixture-of-Experts engines keep eager
        prefills. Returns whether bucketed prefills are on. On a CPU (no graphs) the same padding
        runs eagerly, which is what its tests check."""
        plain = getattr(self.model, "group", None) is None and not any(
            lp.plan.mlp == "moe" for lp in getattr(self.model, "plans", []))
        self.prefill_graph_tokens = tokens if on and plain else 0
        self._prefill_graphs.clear()
        return self.prefill_graph_tokens > 0

    def close(self) -> None:
        """Release the captured CUDA graphs (and their memory pool). A tp engine's graphs hold NCCL
        work: close the engine (or drop every reference to it) before
        ``torch.distributed.destroy_process_group``, which otherwise waits on them forever (seen on two
        H200s). The engine can still generate afterwards; graphs are captured again on first use."""
        self._graphs.clear()
        self._prefill_graphs.clear()
        self._pool = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self) -> None:
        """Compile (or load from cache) every graph and capture the decode step of each bucket."""
        with torch.inference_mode():
            for b in (1, 2) if self.max_batch > 1 else (1,):
                ids = torch.zeros(b, min(16, self.max_seq), dtype=torch.long, device=self.device)
                self.model.prefill(ids, torch.full((b,), ids.shape[1], device=self.device))
            for b in _buckets(self.max_batch):  # every batch at full span, batch 1 at every span
                self._step(b, self.max_seq)
            for kv in _kv_buckets(self.max_seq)[:-1]:
                self._step(1, kv)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- the decode step -------------------------------------------------------------------------
    def _step_eager(self, b: int, kv: int) -> torch.Tensor:
        logits = self.model.decode(self.ids_buf[:b], self.pos_buf[:b], kv)
        self.pos_buf[:b] += 1
        self.ids_buf[:b] = torch.argmax(logits, -1)
        return logits

    def _step(self, b: int, kv: int) -> torch.Tensor:
        """Decode one token for rows [:b] over the first kv cache slots (greedy choice written back
        into ids_buf); returns logits. One CUDA graph per (b, kv) bucket, captured on first use."""
        if not self.use_graphs:
            return self._step_eager(b, kv)
        if (b, kv) not in self._graphs:
            ids, pos = self.ids_buf.clone(), self.pos_buf.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile (or load) and settle allocations outside the capture
                    self._step_eager(b, kv)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step_eager(b, kv)
            self._graphs[(b, kv)] = (graph, logits)
            self.ids_buf.copy_(ids)
            self.pos_buf.copy_(pos)
        graph, logits = self._graphs[(b, kv)]
        graph.replay()
        return logits

    # -- generation ------------------------------------------------------------------------------
    def _encode(self, prompts: list) -> tuple[list[list[int]], bool]:
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise InvalidArgument("text prompts need a tokenizer", hint="pass token ids, or tokenizer= to Engine.load")
            return [list(self.tokenizer.encode(p)) for p in prompts], True
        out = []
        for p in prompts:
            ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            if not ids or not all(isinstance(t, int) for t in ids):
                raise InvalidArgument("each prompt must be a non-empty list of token ids (or a string)")
            out.append(ids)
        return out, False

    def generate(self, prompts: list, max_new_tokens: int = 64, sampling: SamplingConfig | None = None) -> GenerationOutput:
        sampling = sampling or SamplingConfig()
        if isinstance(prompts, (str, torch.Tensor)) and not (isinstance(prompts, torch.Tensor) and prompts.dim() == 2):
            prompts = [prompts]
        seqs, text = self._encode(list(prompts))
        if max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        vocab = self.model.vocab
        for i, s in enumerate(seqs):
            if len(s) > self.max_input:
                raise InvalidArgument(f"prompt {i} has {len(s)} tokens; the engine's max_input_len is {self.max_input}")
            if len(s) + max_new_tokens > self.max_seq:
                raise InvalidArgument(
                    f"prompt {i} ({len(s)} tokens) + max_new_tokens={max_new_tokens} exceeds max_seq_len={self.max_seq}"
                )
            if min(s) < 0 or max(s) >= vocab:
                raise InvalidArgument(f"prompt {i} has token ids outside [0, {vocab})")
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sampling.seed if sampling.seed is not None else self._shared_seed())
        tokens: list[list[int]] = []
        stats = {"prefill_seconds": 0.0, "decode_seconds": 0.0, "batches": 0, "new_tokens": 0}
        with torch.inference_mode():
            for c in range(0, len(seqs), self.max_batch):
                chunk_tokens, st = self._generate_batch(seqs[c:c + self.max_batch], max_new_tokens, sampling, gen)
                tokens += chunk_tokens
                for k in ("prefill_seconds", "decode_seconds", "new_tokens"):
                    stats[k] += st[k]
                stats["batches"] += 1
                stats.setdefault("ttft_seconds", st["prefill_seconds"])
        if stats["decode_seconds"] > 0:
            stats["decode_tokens_per_second"] = stats["new_tokens"] / (stats["prefill_seconds"] + stats["decode_seconds"])
        texts = [self.tokenizer.decode(t) for t in tokens] if (text and self.tokenizer is not None) else None
        return GenerationOutput(tokens=tokens, texts=texts, stats=stats)

    def _shared_seed(self) -> int:
        """A fresh seed for unseeded sampling; a tp engine's ranks take rank 0's, so every rank draws
        the same tokens from its identical (gathered) logits and feeds the same ids to the next step."""
        seed = time.time_ns() % (1 << 62)
        group = getattr(self.model, "group", None)
        if group is None:
            return seed
        import torch.distributed as dist

        t = torch.tensor([seed], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0, group=group)
        return int(t.item())

    def _choose(self, logits: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
        if sampling.temperature <= 0:
            return torch.argmax(logits, -1)
        logits = logits / sampling.temperature
        if sampling.top_k > 0:
            kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), -1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sampling.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, -1)
            drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest set reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _prefill_bucket(self, n: int, T: int) -> tuple[int, int] | None:
        """(batch, length) a bucketed prefill of n prompts of at most T tokens pads to, or None."""
        if not self.prefill_graph_tokens:
            return None
        b = next(x for x in _buckets(self.max_batch) if x >= n)
        length = next((x for x in PREFILL_GRAPH_LENGTHS if x >= T), None)
        if length is None or length > self.max_seq or b * length > self.prefill_graph_tokens:
            return None
        return b, length

    def _prefill_bucketed(self, seqs: list[list[int]], b: int, length: int) -> torch.Tensor:
        """Prefill padded to (b, length): rows past len(seqs) are one token 0 each (they fill cache rows
        no sequence uses), positions past a prompt are masked as in every padded prefill. On a GPU with
        graphs, one CUDA graph per (b, length), captured on first use; last-token logits [n, vocab]."""
        ids = torch.zeros(b, length, dtype=torch.long)
        lengths = torch.ones(b, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            lengths[i] = len(s)
        n = len(seqs)
        if not self.use_graphs:
            return self.model.prefill(ids.to(self.device), lengths.to(self.device))[:n]
        key = (b, length)
        if key not in self._prefill_graphs:
            ids_in, len_in = ids.to(self.device), lengths.to(self.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile (or load) and settle allocations outside the capture
                    self.model.prefill(ids_in, len_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self.model.prefill(ids_in, len_in)
            self._prefill_graphs[key] = (graph, ids_in, len_in, logits)
        graph, ids_in, len_in, logits = self._prefill_graphs[key]
        ids_in.copy_(ids)
        len_in.copy_(lengths)
        graph.replay()
        return logits[:n]

    def _prefill_rows(self, seqs: list[list[int]]) -> torch.Tensor:
        """Right-padded prefill, split into forwards of at most max_num_tokens; last-token logits."""
        T = max(len(s) for s in seqs)
        bucket = self._prefill_bucket(len(seqs), T)
        if bucket is not None:
            return self._prefill_bucketed(seqs, *bucket)
        T = min(-(-T // 8) * 8, self.max_seq)  # pad to a multiple of 8: fewer distinct shapes
        rows_per = max(1, self.max_num_tokens // T)
        out = []
        for r0 in range(0, len(seqs), rows_per):
            part = seqs[r0:r0 + rows_per]
            ids = torch.zeros(len(part), T, dtype=torch.long)
            for i, s in enumerate(part):
                ids[i, :len(s)] = torch.tensor(s)
            lengths = torch.tensor([len(s) for s in part])
            out.append(self.model.prefill(ids.to(self.device), lengths.to(self.device), row0=r0))
        return torch.cat(out, 0)

    def _generate_batch(self, seqs: list[list[int]], max_new: int, sampling: SamplingConfig,
                        gen: torch.Generator | None) -> tuple[list[list[int]], dict]:
        n = len(seqs)
        b = next(x for x in _buckets(self.max_batch) if x >= n)
        self._sync()
        t0 = time.perf_counter()
        logits = self._prefill_rows(seqs)
        self.ids_buf[:b].zero_()
        self.pos_buf[:b].zero_()
        self.ids_buf[:n] = self._choose(logits, sampling, gen)
        self.pos_buf[:n] = torch.tensor([len(s) for s in seqs], device=self.device)
        out = torch.empty(b, max_new, dtype=torch.long, device=self.device)
        out[:, 0] = self.ids_buf[:b]
        self._sync()
        t1 = time.perf_counter()
        eos = sampling.eos_token_id
        eos_t = None if eos is None else torch.tensor([eos] if isinstance(eos, int) else list(eos), device=self.device)
        steps = max_new
        kv = next(k for k in _kv_buckets(self.max_seq) if k >= max(len(s) for s in seqs) + max_new)
        # longrope (Phi-3): step -> rows whose sequence reaches the original length + 1 there (see recompute)
        at = getattr(self.model, "recompute_at", None)
        recompute: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            if at is not None and 1 <= at + 1 - len(s) < max_new:
                recompute.setdefault(at + 1 - len(s), []).append(i)
        for t in range(1, max_new):
            logits = self._step(b, kv)
            if sampling.temperature > 0:
                self.ids_buf[:b] = self._choose(logits, sampling, gen)
            if recompute and t in recompute:
                self._recompute(recompute[t], seqs, out, t, sampling, gen)
            out[:, t] = self.ids_buf[:b]
            if eos_t is not None and t % 16 == 0 and bool(torch.isin(out[:n, :t + 1], eos_t).any(1).all()):
                steps = t + 1
                break
        host = out[:n, :steps].tolist()
        t2 = time.perf_counter()
        eos_set = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        result = []
        for row in host:
            cut = next((i + 1 for i, tok in enumerate(row) if tok in eos_set), len(row))
            result.append(row[:cut])
        return result, {"prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "new_tokens": n * steps}

    def _recompute(self, rows: list[int], seqs: list[list[int]], out: torch.Tensor, t: int,
                   sampling: SamplingConfig, gen: torch.Generator | None) -> None:
        """As transformers' Phi-3 ``prepare_inputs_for_generation``: when a row's sequence first grows past
        the longrope original length, prefill it whole again (the long factors for every position), over
        its cache row, and choose its token from that prefill's logits instead of the decode step's."""
        for i in rows:
            ids = torch.tensor([seqs[i] + out[i, :t].tolist()], device=self.device)
            logits = self.model.prefill(ids, torch.tensor([ids.shape[1]], device=self.device), row0=i)
            self.ids_buf[i:i + 1] = self._choose(logits, sampling, gen)

    def forward(self, ids: torch.Tensor | list[list[int]]) -> torch.Tensor:
        """Float32 logits of every position, [batch, tokens, vocab] (evaluation; equal-length rows)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        B, T = ids.shape
        if T > self.max_seq or B > self.max_batch:
            raise InvalidArgument(f"forward of [{B}, {T}] exceeds the engine's limits "
                                  f"(max_batch_size={self.max_batch}, max_seq_len={self.max_seq})")
        with torch.inference_mode():
            lengths = torch.full((B,), T, device=self.device)
            return self.model.prefill(ids.to(self.device), lengths, all_logits=True).cpu()


def _load_tokenizer(engine_dir: Path):
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    from ..sources.tokenizer import load_tokenizer

    try:
        return load_tokenizer(engine_dir)
    except KilnError:  # a partial or unsafe tokenizer is not worth failing the load for; text prompts will say so
        return None


@contextlib.contextmanager
def engine_in_group(engine_dir: str | os.PathLike, rank: int = 0, world_size: int = 1, init_method: str | None = None,
                    **load_kw):
    """``Engine.load`` inside the engine's tp group (joined here; nothing to join for one rank). On
    exit the engine is closed before the group ends: a live tp engine's captured graphs hold NCCL
    work, and ``destroy_process_group`` then waits forever (seen on two H200s)."""
    join_group(engine_dir, rank, world_size, init_method)
    try:
        engine = Engine.load(engine_dir, **load_kw)
        try:
            yield engine
        finally:
            engine.close()
            del engine
    finally:
        leave_group()


def run_generate(args) -> dict:
    """Load the engine (inside its tp group when ``args.world_size`` > 1) and generate one prompt."""
    tokenizer = None
    if args.tokenizer:
        tokenizer = _load_tokenizer(Path(args.tokenizer))
        if tokenizer is None:
            raise InvalidArgument(f"no tokenizer could be loaded from {args.tokenizer}",
                                  hint="a Hugging Face model folder with tokenizer.json / tokenizer_config.json")
    if args.ids is not None:
        try:
            prompt = [int(x) for x in args.ids.split(",")]
        except ValueError:
            raise InvalidArgument(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    else:
        prompt = args.prompt
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    with engine_in_group(args.engine_dir, args.rank, args.world_size, args.init_method, tokenizer=tokenizer) as engine:
        out = engine.generate([prompt], args.max_new_tokens, sampling)
        return {"tokens": out.tokens[0], "text": out.texts[0] if out.texts else None, "stats": out.stats,
                "load": engine.load_stats, "device": str(engine.device), "tp_size": engine.config["engine"].get("tp_size", 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.compiler.engine.engine")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("warmup", help="load, compile and capture every graph (fills the compile cache); "
                                      "a tp engine: once per rank, as run_ranks starts it")
    w.add_argument("engine_dir")
    add_rank_arguments(w)
    g = sub.add_parser("generate", help="generate from one prompt (a tp engine: once per rank, as run_ranks "
                                        "starts it; rank 0 prints)")
    add_generate_arguments(g)
    add_rank_arguments(g)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.cmd == "warmup":
        with engine_in_group(args.engine_dir, args.rank, args.world_size, args.init_method, warmup=True) as engine:
            stats = {"load_seconds": round(time.perf_counter() - t0, 3), **engine.load_stats}
        print(json.dumps(stats))
        return 0
    result = run_generate(args)
    if args.rank == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    exit_rank(main())

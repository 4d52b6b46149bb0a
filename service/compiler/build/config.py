"""BuildConfig: the engine build's knobs (named after ``trtllm-build``'s), validated before any work.

``BuildConfig(...).validate(checkpoint_config)`` resolves defaults against the model, checks every
limit, and checks a memory estimate (weights + KV cache at the limits + activations) against the
target's memory, raising a typed error that names the numbers. Nothing is read but config.json.

    cfg = BuildConfig(max_batch_size=8, max_seq_len=4096, dtype="bfloat16", target="h100")
    plan = cfg.validate(load_config(ckpt_dir))    # -> ResolvedBuild (with .estimate)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import InvalidArgument, KilnError

BACKENDS = ("torch", "onnx", "tensorrt", "trtllm")
KV_CACHE_TYPES = ("continuous", "paged", "disabled")  # trtllm-build's --kv_cache_type values
ENGINE_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DECILM_ARCH = "DeciLMForCausalLM"  # Nemotron-NAS: heterogeneous layers, torch backend only
TORCH_ONLY_ARCHS = ("Phi3ForCausalLM",)  # families of the composable decoder (models/spec.py)
GPT_ARCHS = ("GPTForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM")  # torch and onnx backends
MOE_ARCHS = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")  # torch backend only
# q/k-norm and Gemma dense families (issue 17): torch backend
QWEN3_GEMMA_ARCHS = ("Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
GIB = 1 << 30


class InvalidBuildConfig(InvalidArgument):
    code = "invalid_build_config"


class UnknownBackend(InvalidBuildConfig):
    code = "unknown_backend"
    default_hint = f"backends are {', '.join(BACKENDS)}; `kiln capabilities` lists those installed here"


class BackendUnavailable(KilnError):
    """A known backend that cannot run on this machine (its package does not import, no GPU...)."""

    code = "backend_unavailable"


class TargetUnavailable(KilnError):
    """The target GPU is not present on the machine asked to build for it."""

    code = "target_unavailable"
    default_hint = "send the build to a worker on that GPU (queue build.<sm>), or build with target='cpu'"


class EngineDoesNotFit(KilnError):
    """The memory estimate at the configured limits exceeds the target's memory."""

    code = "engine_does_not_fit"
    default_hint = "lower max_batch_size or max_seq_len, use a 16-bit dtype, or use tensor parallelism"


@dataclass(frozen=True)
class GpuTarget:
    name: str
    sm: int  # compute capability as major*10+minor (90 for Hopper)
    memory_bytes: int


# Nominal memory of known targets (used when the target is not on this machine, e.g. a CPU pre-check).
KNOWN_TARGETS: dict[str, GpuTarget] = {
    "h100": GpuTarget("h100", 90, 80 * GIB),
    "h200": GpuTarget("h200", 90, 141 * GIB),
    "gh200": GpuTarget("gh200", 90, 96 * GIB),
    "a100": GpuTarget("a100", 80, 80 * GIB),
    "a10g": GpuTarget("a10g", 86, 24 * GIB),
    "l4": GpuTarget("l4", 89, 24 * GIB),
    "l40s": GpuTarget("l40s", 89, 48 * GIB),
    "sm80": GpuTarget("sm80", 80, 80 * GIB),
    "sm86": GpuTarget("sm86", 86, 24 * GIB),
    "sm89": GpuTarget("sm89", 89, 24 * GIB),
    "sm90": GpuTarget("sm90", 90, 80 * GIB),
}


@dataclass(frozen=True)
class BuildConfig:
    """What to build. ``None`` means "derive from the model" (as trtllm-build does)."""

    max_batch_size: int = 8
    max_input_len: int = 1024
    max_seq_len: int | None = None  # default: min(max_position_embeddings, max_input_len + 1024)
    max_num_tokens: int | None = None  # tokens per prefill forward; default max_batch_size * max_input_len
    kv_cache_type: str = "continuous"  # the torch engine's static KV cache is a continuous one
    dtype: str = "auto"  # engine dtype; auto = the checkpoint's
    target: str = "auto"  # "cpu", "auto" (this machine), a GPU name ("h100") or an arch ("sm90")
    backend: str = "torch"
    use_cuda_graph: bool = True  # decode step captured per batch-size bucket (torch backend, GPU)
    compile: bool = True  # torch.compile on GPU; CPU engines run eagerly unless compile_on_cpu
    compile_on_cpu: bool = False
    compile_mode: str | None = None  # torch.compile mode (None = "default"; chosen by measurement)
    compile_options: dict | None = None  # Inductor options, e.g. {"coordinate_descent_tuning": True}
    memory_fraction: float = 0.92  # share of the target's memory the estimate may use
    measure_performance: bool = True  # time the finished engine (performance.json); False: the file says
    #                                   why its figures are null (benchmarks that time engines themselves)
    keep_tensor_parallel: bool = False  # torch backend: one engine file per tp rank (run one process
    #                                     per rank); False merges a split checkpoint into one rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BuildConfig:
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(d) - known)
        if extra:
            raise InvalidBuildConfig(f"unknown build_config keys: {', '.join(extra)}")
        return cls(**d)

    def validate(self, ckpt_config: dict, *, weight_bytes: int | None = None,
                 machine_gpus: list[GpuTarget] | None = None) -> ResolvedBuild:
        return validate_build(self, ckpt_config, weight_bytes=weight_bytes, machine_gpus=machine_gpus)


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    overhead_bytes: int
    budget_bytes: int  # memory_fraction x the target's memory

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activations_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def line(self) -> str:
        g = 1e9
        return (f"weights {self.weights_bytes / g:.2f} GB + KV cache {self.kv_cache_bytes / g:.2f} GB + "
                f"activations {self.activations_bytes / g:.2f} GB + overhead {self.overhead_bytes / g:.2f} GB = "
                f"{self.total_bytes / g:.2f} GB vs {self.budget_bytes / g:.2f} GB usable")

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}


@dataclass(frozen=True)
class ResolvedBuild:
    config: BuildConfig  # every None resolved
    target: GpuTarget | None  # None = CPU
    estimate: MemoryEstimate

    @property
    def arch_tag(self) -> str:
        return "cpu" if self.target is None else f"sm{self.target.sm}"


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidBuildConfig(f"{name} must be a positive integer, got {value!r}")
    return value


def kv_bytes_per_token(ckpt: dict, dtype: str) -> int:
    """K + V bytes per token of the merged (one-rank) engine: only layers with a KV cache count, each
    with its own KV-head count (Nemotron-NAS no-op / linear attention layers have none)."""
    from ..checkpoint.pipeline_split import kv_cache_bytes_per_token

    return kv_cache_bytes_per_token({**ckpt, "dtype": dtype}, 1)


def estimate_weight_bytes(ckpt: dict, dtype: str) -> int:
    """Parameter count of a Llama-family model from config.json alone, times the engine dtype's size
    (a DeciLM model's per-layer parts are priced by the pipeline cost model)."""
    if ckpt.get("architecture") == DECILM_ARCH:
        from ..checkpoint.pipeline_split import stage_costs

        return stage_costs({**ckpt, "dtype": dtype}, [int(ckpt["num_hidden_layers"])], tp=1)[0].weight_bytes
    H, L, V = int(ckpt["hidden_size"]), int(ckpt["num_hidden_layers"]), int(ckpt["vocab_size"])
    nh = int(ckpt["num_attention_heads"])
    nkv = int(ckpt.get("num_key_value_heads") or nh)
    d = int(ckpt.get("head_size") or H // nh)
    inter = int(ckpt.get("intermediate_size") or 4 * H)
    mlp = 3 * inter * H
    if ckpt.get("architecture") in MOE_ARCHS:  # every expert, the router and a shared expert
        from ..models.moe import moe_settings

        experts, _, expert_inter, shared, _ = moe_settings(ckpt)
        mlp = experts * 3 * expert_inter * H + experts * H + (3 * shared * H + H if shared else 0)
    per_layer = (nh + 2 * nkv) * d * H + nh * d * H + mlp + 2 * H
    return (L * per_layer + 2 * V * H + H) * ENGINE_DTYPES[dtype]


def machine_gpu_targets() -> list[GpuTarget]:
    """This machine's GPUs (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(GpuTarget(p.name, p.major * 10 + p.minor, int(p.total_memory)))
    return out


def resolve_target(name: str, machine_gpus: list[GpuTarget]) -> GpuTarget | None:
    """None for CPU; a GpuTarget (with this machine's real memory when the GPU is present)."""
    key = name.lower()
    if key == "cpu":
        return None
    if key == "auto":
        return machine_gpus[0] if machine_gpus else None
    if key not in KNOWN_TARGETS:
        raise InvalidBuildConfig(
            f"unknown target {name!r}", hint=f"use cpu, auto, or one of {', '.join(sorted(KNOWN_TARGETS))}"
        )
    nominal = KNOWN_TARGETS[key]
    for gpu in machine_gpus:
        if gpu.sm == nominal.sm:
            return GpuTarget(key, gpu.sm, gpu.memory_bytes)
    return nominal


def validate_build(cfg: BuildConfig, ckpt: dict, *, weight_bytes: int | None = None,
                   machine_gpus: list[GpuTarget] | None = None) -> ResolvedBuild:
    """Resolve defaults and fail fast, before any tensor is read."""
    if cfg.backend not in BACKENDS:
        raise UnknownBackend(f"unknown backend {cfg.backend!r}")
    for flag in ("use_cuda_graph", "compile", "compile_on_cpu", "measure_performance", "keep_tensor_parallel"):
        if not isinstance(getattr(cfg, flag), bool):  # "false" from a JSON string would read as true
            raise InvalidBuildConfig(f"{flag} must be true or false, got {getattr(cfg, flag)!r}")
    if cfg.kv_cache_type not in KV_CACHE_TYPES:
        raise InvalidBuildConfig(f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}, got {cfg.kv_cache_type!r}")
    if cfg.backend in ("torch", "onnx", "tensorrt") and cfg.kv_cache_type != "continuous":
        raise InvalidBuildConfig(
            f"the {cfg.backend} backend supports kv_cache_type='continuous' only (a static KV cache), "
            f"got {cfg.kv_cache_type!r}", hint="paged KV caches are built by the trtllm backend",
        )
    arch = ckpt.get("architecture")
    also = {"torch": GPT_ARCHS + (DECILM_ARCH,) + MOE_ARCHS + TORCH_ONLY_ARCHS + QWEN3_GEMMA_ARCHS, "onnx": GPT_ARCHS,
            "tensorrt": ()}.get(cfg.backend)
    if also is not None and arch not in LLAMA_ARCHS + also:
        raise InvalidBuildConfig(f"the {cfg.backend} backend builds the Llama family ({', '.join(LLAMA_ARCHS)})"
                                 + (f" and {', '.join(also)}" if also else "") + f", not {arch!r}")
    if arch == DECILM_ARCH and cfg.keep_tensor_parallel and int((ckpt.get("mapping") or {}).get("tp_size", 1)) > 1:
        raise InvalidBuildConfig(
            f"{DECILM_ARCH} engines run as one rank: keep_tensor_parallel is not supported for them",
            hint="build with keep_tensor_parallel=False; the tp checkpoint is merged into one engine",
        )
    qcfg = ckpt.get("quantization") or {}
    quant = qcfg.get("quant_algo") or (qcfg.get("kv_cache_quant_algo") and f"{qcfg['kv_cache_quant_algo']} KV cache")
    if quant and cfg.backend in ("onnx", "tensorrt"):
        raise InvalidBuildConfig(f"quantized checkpoints ({quant}) are not built by the {cfg.backend} backend",
                                 hint="build them with the torch backend (FP8, weight-only, AWQ) or trtllm")
    if quant and cfg.backend == "torch":
        from ..engine.engine_quant import check_engine_quant

        assert arch is not None  # the torch backend's architectures were checked above
        try:
            check_engine_quant(qcfg, arch)
        except KilnError as exc:
            raise InvalidBuildConfig(exc.message, hint=exc.hint) from exc
    dtype = ckpt["dtype"] if cfg.dtype == "auto" else cfg.dtype
    if dtype not in ENGINE_DTYPES:
        raise InvalidBuildConfig(f"dtype must be auto, {', '.join(ENGINE_DTYPES)}; got {cfg.dtype!r}")
    if not 0 < cfg.memory_fraction <= 1:
        raise InvalidBuildConfig(f"memory_fraction must be in (0, 1], got {cfg.memory_fraction!r}")
    batch = _positive_int("max_batch_size", cfg.max_batch_size)
    max_input = _positive_int("max_input_len", cfg.max_input_len)
    model_max = int(ckpt.get("max_position_embeddings") or 2048)
    if cfg.max_seq_len is None:
        seq = min(model_max, max_input + 1024)
    else:
        seq = _positive_int("max_seq_len", cfg.max_seq_len)
    if seq > model_max:
        raise InvalidBuildConfig(
            f"max_seq_len={seq} is beyond the model's max_position_embeddings={model_max}",
            hint=f"use max_seq_len <= {model_max}",
        )
    if max_input > seq:
        if cfg.max_seq_len is not None:
            raise InvalidBuildConfig(f"max_input_len={max_input} exceeds max_seq_len={seq}")
        max_input = seq
    num_tokens = batch * max_input if cfg.max_num_tokens is None else _positive_int("max_num_tokens", cfg.max_num_tokens)
    if num_tokens < max_input:
        raise InvalidBuildConfig(
            f"max_num_tokens={num_tokens} is smaller than max_input_len={max_input}: a prompt must fit one forward"
        )

    gpus = machine_gpu_targets() if machine_gpus is None else machine_gpus
    target = resolve_target(cfg.target, gpus)
    if cfg.backend in ("torch", "tensorrt", "trtllm") and target is not None:
        if not any(g.sm == target.sm for g in gpus):
            present = ", ".join(f"{g.name} (sm{g.sm})" for g in gpus) or "no GPU"
            raise TargetUnavailable(
                f"target {cfg.target!r} (sm{target.sm}) is not present on this machine ({present}); "
                f"a {cfg.backend} engine is compiled on the GPU it is built for"
            )
    if cfg.backend in ("tensorrt", "trtllm") and target is None:
        raise InvalidBuildConfig(f"the {cfg.backend} backend builds for a GPU; target='cpu' is not possible")

    resolved = replace(cfg, dtype=dtype, max_seq_len=seq, max_input_len=max_input, max_num_tokens=num_tokens)
    estimate = memory_estimate(resolved, ckpt, target, weight_bytes)
    if not estimate.fits:
        where = "host memory" if target is None else f"{target.name} (sm{target.sm})"
        raise EngineDoesNotFit(
            f"engine does not fit {where} at max_batch_size={batch}, max_seq_len={seq}: {estimate.line()}"
        )
    return ResolvedBuild(config=resolved, target=target, estimate=estimate)


def memory_estimate(cfg: BuildConfig, ckpt: dict, target: GpuTarget | None,
                    weight_bytes: int | None = None) -> MemoryEstimate:
    """Weights + KV cache for max_batch_size x max_seq_len + the largest forward's activations."""
    import psutil

    dtype = cfg.dtype
    assert cfg.max_seq_len is not None and cfg.max_num_tokens is not None  # resolved by validate_build
    weights = weight_bytes if weight_bytes is not None else estimate_weight_bytes(ckpt, dtype)
    kv = kv_bytes_per_token(ckpt, dtype) * cfg.max_batch_size * cfg.max_seq_len
    H = int(ckpt["hidden_size"])
    inter = int(ckpt.get("intermediate_size") or 4 * H)
    nh = int(ckpt["num_attention_heads"])
    elt = ENGINE_DTYPES[dtype]
    # prefill: a few hidden-size buffers plus the fused gate/up output per token, and fp32 logits of
    # the last token of every row (all tokens' logits only when asked for, in evaluation)
    per_token = (6 * H + 3 * inter + 2 * nh * 64) * elt
    acts = cfg.max_num_tokens * per_token + cfg.max_batch_size * int(ckpt["vocab_size"]) * 4 * 2
    overhead = 0 if target is None else 1 * GIB  # CUDA context, cuBLAS workspaces, graph pools
    total_mem = psutil.virtual_memory().total if target is None else target.memory_bytes
    return MemoryEstimate(weights, kv, acts, overhead, int(total_mem * cfg.memory_fraction))


__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "BuildConfig",
    "EngineDoesNotFit",
    "GpuTarget",
    "InvalidBuildConfig",
    "KNOWN_TARGETS",
    "MemoryEstimate",
    "ResolvedBuild",
    "TargetUnavailable",
    "UnknownBackend",
    "estimate_weight_bytes",
    "kv_bytes_per_token",
    "memory_estimate",
    "validate_build",
]

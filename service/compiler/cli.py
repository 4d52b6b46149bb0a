"""Compiler sub-commands of ``kiln``: convert, validate, build, generate.

    kiln convert SRC OUT --dtype bfloat16 --tp-size 2 --pp-size 1
    kiln validate OUT [--strict] [--json]
    kiln build CKPT ENGINE [--backend torch] [--max-batch-size 8 --max-input-len 1024 --max-seq-len N]
               [--target auto|cpu|h100|sm90] [--keep-tensor-parallel]
    kiln generate ENGINE --prompt TEXT | --ids 1,2,3 [--max-new-tokens 16] [--temperature T --seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .engine.cli_args import add_generate_arguments, generate_argv
from .errors import KilnError


class ProgressBar:
    """A dependency-free progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.last_line = -1

    def __call__(self, fraction: float, message: str) -> None:
        pct = int(fraction * 100)
        elapsed = time.perf_counter() - self.start
        if self.tty:
            width = 30
            fill = int(fraction * width)
            bar = "#" * fill + "-" * (width - fill)
            self.stream.write(f"\r{self.label} [{bar}] {pct:3d}% {elapsed:6.1f}s {message[:40]:<40}")
            if fraction >= 1.0:
                self.stream.write("\n")
            self.stream.flush()
        elif pct // 10 != self.last_line or fraction >= 1.0:
            self.last_line = pct // 10
            self.stream.write(f"{self.label}: {pct}% ({elapsed:.1f}s)\n")
            self.stream.flush()


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint.mapping import Mapping
    from .convert import convert_checkpoint
    from .sources.hub import resolve_model_dir

    try:
        model_dir = resolve_model_dir(
            args.src,
            revision=args.revision,
            cache_dir=args.cache_dir,
            token=os.environ.get(args.token_env) if args.token_env else None,
            allow_download=not args.offline,
        )
        mapping = Mapping(tp_size=args.tp_size, pp_size=args.pp_size)
        if args.pp_split == "balanced" and args.pp_size > 1:
            from .checkpoint.pipeline_split import balanced_mapping
            from .sources.weights import read_json

            mapping = balanced_mapping(read_json(model_dir / "config.json", "config.json"),
                                       tp=args.tp_size, pp=args.pp_size)
        if args.quantization or args.kv_cache_quantization:
            summary = _quantize(args, model_dir, mapping)
        else:
            summary = convert_checkpoint(
                model_dir,
                args.out,
                dtype=args.dtype,
                mapping=mapping,
                allow_pickle=args.allow_pickle,
                overwrite=args.overwrite,
                progress=None if args.quiet else ProgressBar("convert"),
                workers=args.workers,
            )
    except KilnError as exc:
        return _report_error(exc)
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        print(summary.line())
    return 0


def _quantize(args: argparse.Namespace, model_dir, mapping):
    from .quantization import CalibrationSettings, QuantConfig, quantize_checkpoint

    if mapping.world_size != 1:
        from .errors import InvalidArgument

        raise InvalidArgument("--quantization runs at --tp-size 1 --pp-size 1",
                              hint="quantize first, then shard the quantized checkpoint")
    cfg = QuantConfig(args.quantization, kv_cache_quant_algo=args.kv_cache_quantization, group_size=args.group_size,
                      has_zero_point=args.has_zero_point, smoothquant_alpha=args.smoothquant_alpha,
                      exclude_modules=args.exclude_modules)
    calib = CalibrationSettings(samples=args.calibration_samples, seq_len=args.calibration_seq_len,
                                **({"source": args.calibration_file} if args.calibration_file else {}))
    from .convert import from_hugging_face

    model = from_hugging_face(model_dir, dtype=args.dtype, allow_pickle=args.allow_pickle)
    try:
        return quantize_checkpoint(model, args.out, cfg, calibration=calib, target_sm=args.target_sm,
                                   overwrite=args.overwrite, progress=None if args.quiet else ProgressBar("quantize"))
    finally:
        model.close()


def _report_error(exc: KilnError) -> int:
    print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    return 2


def _build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .build import BuildConfig, build

    start = time.perf_counter()
    try:
        bc = BuildConfig(max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                         max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens, dtype=args.dtype,
                         target=args.target, backend=args.backend, use_cuda_graph=not args.no_cuda_graph,
                         measure_performance=not args.no_measure, keep_tensor_parallel=args.keep_tensor_parallel)
        stats = build(args.checkpoint, bc, args.out, overwrite=args.overwrite,
                      progress=None if args.quiet else ProgressBar("build"))
    except KilnError as exc:
        return _report_error(exc)
    out = Path(args.out).absolute()
    engine = json.loads((out / "config.json").read_text()).get("engine", {})
    perf_file = out / "performance.json"
    perf = json.loads(perf_file.read_text()) if perf_file.is_file() else {}
    summary = {"engine_dir": str(out), "backend": args.backend, "arch": engine.get("arch"),
               "tp_size": engine.get("tp_size", 1), **stats, "performance": perf}
    if args.json:
        print(json.dumps(summary))
    else:
        rate = perf.get("decode_tokens_per_second_batch_1")
        print(f"built {args.backend} engine ({summary['arch']}, tp={summary['tp_size']}) -> {out}: "
              f"{stats['weights_bytes'] / 1e9:.2f} GB of weights, built in {stats['build_seconds']:.1f} s"
              + (f", timed in {time.perf_counter() - start - stats['build_seconds']:.1f} s: decode {rate:.1f} tok/s "
                 "at batch 1" if rate else ""))
    return 0


def _generate(args: argparse.Namespace) -> int:
    """One prompt through an engine; a tp engine runs one process per rank (its GPUs, or gloo on the
    CPU) and rank 0's result is printed."""
    from pathlib import Path

    try:
        cfg = json.loads((Path(args.engine_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        from .errors import InvalidCheckpoint

        return _report_error(InvalidCheckpoint(f"{args.engine_dir} is not an engine directory: {exc}"))
    tp = int(cfg.get("engine", {}).get("tp_size", 1))
    try:
        if tp == 1:
            from .engine.engine import run_generate

            args.rank, args.world_size, args.init_method = 0, 1, None
            result = run_generate(args)
        else:
            from .engine.ranks import run_ranks

            outs = run_ranks(["-m", "service.compiler.engine.engine", "generate", *generate_argv(args)], tp,
                             what=f"generating with the tp={tp} engine", timeout_s=args.timeout)
            result = json.loads(outs[0].strip().splitlines()[-1])
    except KilnError as exc:
        return _report_error(exc)
    except (RuntimeError, TimeoutError) as exc:  # a rank failed (its stderr is in the message) or ran too long
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"] if result.get("text") is not None else ",".join(map(str, result["tokens"])))
        st = result["stats"]
        print(f"{len(result['tokens'])} tokens on {result['device']} (tp={result['tp_size']}): "
              f"TTFT {1e3 * st.get('ttft_seconds', 0):.1f} ms, "
              f"{st.get('decode_tokens_per_second', 0):.1f} tok/s end to end", file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .checkpoint.validate import validate_checkpoint

    report = validate_checkpoint(args.dir, strict=args.strict)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.warnings:
            print(f"warning: {line}")
        for line in report.errors:
            print(f"error: {line}")
        n = sum(1 for r in report.ranks if r.ok)
        status = "OK" if report.ok else "INVALID"
        print(f"{status}: {args.dir} ({report.architecture}, {n}/{report.world_size} rank files valid, "
              f"{len(report.errors)} errors, {len(report.warnings)} warnings)")
    return 0 if report.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    from .models import supported_hf_architectures

    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face model into a TensorRT-LLM checkpoint",
        description="Convert a HF model folder or cached repo id into config.json + rank{N}.safetensors. "
        f"Supported architectures: {', '.join(supported_hf_architectures())}.",
    )
    p.add_argument("src", help="local HF model folder, or a repo id resolved through the HF cache")
    p.add_argument("out", help="output checkpoint directory (written atomically)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--pp-size", type=int, default=1)
    p.add_argument("--pp-split", default="even", choices=["even", "balanced"],
                   help="pipeline stages: TensorRT-LLM's even split (default) or Kiln's cost-balanced split "
                   "(weight bytes, FLOPs and KV-cache bytes per layer; runs on Kiln's engine only)")
    p.add_argument("--revision", default=None, help="repo revision (with a repo id)")
    p.add_argument("--cache-dir", default=None, help="HF cache folder (default: huggingface_hub's)")
    p.add_argument("--token-env", default=None, help="name of the environment variable holding an HF token")
    p.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept *.bin/*.pt weights (loaded with torch.load(weights_only=True))")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    p.add_argument("--workers", type=int, default=2, help="threads producing tensors (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    q = p.add_argument_group("quantization (service/compiler/quantization; written at tp=1, pp=1)")
    q.add_argument("--quantization", default=None, metavar="ALGO",
                   help="FP8, FP8_PER_CHANNEL_PER_TOKEN, W8A16, W4A16, W4A16_AWQ or W8A8_SQ_PER_CHANNEL")
    q.add_argument("--kv-cache-quantization", default=None, metavar="ALGO", help="INT8 or FP8 (calibrated)")
    q.add_argument("--calibration-file", default=None, help="UTF-8 text file (default: bundled English text)")
    q.add_argument("--calibration-samples", type=int, default=128)
    q.add_argument("--calibration-seq-len", type=int, default=512)
    q.add_argument("--group-size", type=int, default=128, help="W4A16_AWQ group size (must divide in-features)")
    q.add_argument("--has-zero-point", action="store_true", help="W4A16_AWQ with zero points (asymmetric)")
    q.add_argument("--smoothquant-alpha", type=float, default=None, help="fix alpha (default: per-model search)")
    q.add_argument("--exclude-modules", nargs="*", default=None, help="fnmatch patterns added to the defaults")
    q.add_argument("--target-sm", default=None, help="target GPU compute capability (e.g. sm_89): FP8 needs >= 8.9")
    p.set_defaults(func=_convert)

    v = sub.add_parser("validate", help="check a TensorRT-LLM checkpoint's tensors against its config.json")
    v.add_argument("dir")
    v.add_argument("--strict", action="store_true", help="unexpected tensors are errors")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_validate)

    b = sub.add_parser("build", help="build an engine from a TensorRT-LLM checkpoint (trtllm-build's main knobs)",
                       description="Build an engine directory (config.json with version / pretrained_config / "
                       "build_config, per-rank engine files, compile cache, performance.json). Limits are "
                       "checked against the model and the target's memory before anything is written.")
    b.add_argument("checkpoint", help="checkpoint directory (kiln convert's output)")
    b.add_argument("out", help="engine directory (written atomically)")
    b.add_argument("--backend", default="torch", help="torch (default), onnx, tensorrt, trtllm (where installed)")
    b.add_argument("--target", default="auto", help="auto (this machine), cpu, a GPU name (h100) or an arch (sm90)")
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    b.add_argument("--max-batch-size", type=int, default=8)
    b.add_argument("--max-input-len", type=int, default=1024)
    b.add_argument("--max-seq-len", type=int, default=None, help="default: min(model's positions, input + 1024)")
    b.add_argument("--max-num-tokens", type=int, default=None, help="tokens per prefill forward")
    b.add_argument("--keep-tensor-parallel", action="store_true",
                   help="one engine file per tp rank of the checkpoint (run one process per GPU); "
                   "default: a split checkpoint is merged into one rank")
    b.add_argument("--no-cuda-graph", action="store_true", help="decode without CUDA graphs (GPU)")
    b.add_argument("--no-measure", action="store_true", help="skip timing the engine (performance.json says so)")
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    b.set_defaults(func=_build)

    g = sub.add_parser("generate", help="generate from one prompt with a torch engine (tp engines: one process "
                                        "per rank)")
    add_generate_arguments(g)
    g.add_argument("--timeout", type=float, default=1800, help="seconds a tp engine's ranks may take")
    g.add_argument("--json", action="store_true", help="print tokens, text and timings as JSON")
    g.set_defaults(func=_generate)

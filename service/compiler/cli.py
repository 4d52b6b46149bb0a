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
import re
import shutil
import sys
import time

from .engine.cli_args import add_generate_arguments, generate_argv
from .errors import KilnError


class HelpFormatter(argparse.HelpFormatter):
    """Wraps description and epilog text to the terminal, paragraph by paragraph, but keeps indented lines
    (command listings, examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out: list[str] = []
        para: list[str] = []

        def flush() -> None:
            if para:
                out.append(textwrap.fill(" ".join(para), width, initial_indent=indent, subsequent_indent=indent))
                para.clear()

        for line in text.splitlines():
            if not line.strip():
                flush()
                out.append("")
            elif line[0].isspace():
                flush()
                out.append(indent + line)
            else:
                para.append(line.strip())
        flush()
        return "\n".join(out)


_RANK_PREFIX = re.compile(r"^rank (\d+)/(\d+) (.*)$", re.S)


def _fmt_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def tail(text: str, room: int) -> str:
    """``text`` cut to ``room`` characters keeping its end (a tensor name's distinguishing part)."""
    if len(text) <= room:
        return text
    return "…" + text[-(room - 1):] if room > 1 else text[-room:] if room > 0 else ""


class ProgressBar:
    """A dependency-free progress bar on stderr (plain lines every 10% when stderr is not a terminal).

    ``start`` is the command's clock (``time.perf_counter()``): the bar's elapsed time and ETA count from
    it, and the command's summary line uses the same clock (``elapsed()`` / ``finish(seconds)``), so the
    two agree. A message ``"rank N/M name"`` (convert's, for a split checkpoint) shows a rank label; long
    names keep their tail, as wide as the terminal allows.
    """

    def __init__(self, label: str, stream=None, *, start: float | None = None, columns: int | None = None):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter() if start is None else start
        self.columns = columns or (shutil.get_terminal_size((100, 24)).columns if self.tty else 100)
        self.last_decile = -1
        self.fraction = 0.0
        self.message = ""
        self.finished = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def render(self, fraction: float, elapsed: float, message: str, final: bool = False, eta: bool = True) -> str:
        """The bar's line at ``fraction`` done after ``elapsed`` seconds (sized to the terminal on a tty);
        ``eta=False``: a phase whose length the fraction does not measure ("ETA --")."""
        m = _RANK_PREFIX.match(message)
        rank, name = (f"rank {m.group(1)}/{m.group(2)} ", m.group(3)) if m else ("", message)
        pct = int(fraction * 100)
        if final:
            timing = f"{_fmt_seconds(elapsed)}"
        elif eta and 0.0 < fraction < 1.0:
            timing = f"{_fmt_seconds(elapsed)} ETA {_fmt_seconds(elapsed * (1 - fraction) / fraction)}"
        else:
            timing = f"{_fmt_seconds(elapsed)} ETA --"
        if not self.tty:
            return f"{self.label}: {pct}% {timing}" + (f" {rank}{name}".rstrip() if name or rank else "")
        text = f"{pct:3d}% {timing:<15} {rank}"
        # the bar gives way to the name on narrow terminals (10..30 cells; names get >= 50 where possible)
        width = min(30, max(10, self.columns - len(self.label) - len(text) - 4 - 1 - 50))
        fill = int(fraction * width)
        head = f"{self.label} [{'#' * fill}{'-' * (width - fill)}] {text}"
        room = max(self.columns - len(head) - 1, 20)
        return f"{head}{tail(name, room):<{room}}"

    def __call__(self, fraction: float, message: str) -> None:
        if self.finished:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        # a new message at the same fraction is a phase the fraction does not measure (e.g. a build's
        # "timing the engine" after its weights): no ETA for it, and a line of its own in logs
        phase = fraction <= self.fraction and message != self.message and fraction > 0.0
        self.fraction, self.message = fraction, message
        if fraction >= 1.0:  # the command's finish() draws 100% with the summary's seconds
            fraction = 0.999
        line = self.render(fraction, self.elapsed(), message, final=False, eta=not phase)
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif int(fraction * 10) != self.last_decile or phase:
            self.last_decile = int(fraction * 10)
            self.stream.write(line + "\n")
            self.stream.flush()

    def abort(self) -> None:
        """End a half-drawn terminal line before an error message."""
        if self.tty and not self.finished and self.fraction > 0.0:
            self.stream.write("\n")
            self.stream.flush()
        self.finished = True

    def finish(self, seconds: float | None = None, message: str = "done") -> float:
        """Draw the 100% line with ``seconds`` (default: ``elapsed()``) and return them, for the summary."""
        seconds = self.elapsed() if seconds is None else seconds
        if not self.finished:
            self.finished = True
            prefix = "\r" if self.tty else ""
            self.stream.write(prefix + self.render(1.0, seconds, message, final=True).rstrip() + "\n")
            self.stream.flush()
        return seconds


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint.mapping import Mapping
    from .convert import convert_checkpoint
    from .sources.hub import resolve_model_dir

    start = time.perf_counter()  # one clock: the bar's elapsed time and ETA, and the summary's seconds
    bar = None if args.quiet else ProgressBar("quantize" if args.quantization or args.kv_cache_quantization
                                              else "convert", start=start)
    try:
        model_dir = resolve_model_dir(
            args.src,
            revision=args.revision,
            cache_dir=args.cache_dir,
            token=os.environ.get(args.token_env) if args.token_env else None,
            allow_download=not args.offline,
        )
        mapping = Mapping(tp_size=args.tp_size, pp_size=args.pp_size, moe_ep_size=args.moe_ep_size)
        if args.pp_split == "balanced" and args.pp_size > 1:
            from .checkpoint.pipeline_split import balanced_mapping
            from .sources.layout import model_config

            mapping = balanced_mapping(model_config(model_dir), tp=args.tp_size, pp=args.pp_size)
        if args.quantization or args.kv_cache_quantization:
            summary = _quantize(args, model_dir, mapping, bar)
        else:
            summary = convert_checkpoint(
                model_dir,
                args.out,
                dtype=args.dtype,
                mapping=mapping,
                allow_pickle=args.allow_pickle,
                overwrite=args.overwrite,
                progress=bar,
                workers=args.workers,
            )
    except KilnError as exc:
        return _report_error(exc, bar)
    # the command's wall time (reading the source, planning, writing), as the bar showed it
    summary.seconds = bar.finish() if bar is not None else time.perf_counter() - start
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        print(summary.line())
    return 0


def _quantize(args: argparse.Namespace, model_dir, mapping, bar: ProgressBar | None):
    from .errors import InvalidArgument
    from .quantization import CalibrationSettings, QuantConfig, quantize_checkpoint

    if mapping.world_size != 1:
        raise InvalidArgument("--quantization runs at --tp-size 1 --pp-size 1",
                              hint="quantize first, then shard the quantized checkpoint")
    method = args.calibration_method
    if args.fast:
        if method not in (None, "max"):
            raise InvalidArgument("--fast is --calibration-method max; it cannot be combined with "
                                  f"--calibration-method {method}")
        method = "max"
    cfg = QuantConfig(args.quantization, kv_cache_quant_algo=args.kv_cache_quantization, group_size=args.group_size,
                      has_zero_point=args.has_zero_point, smoothquant_alpha=args.smoothquant_alpha,
                      exclude_modules=args.exclude_modules, calibration_method=method)
    calib = CalibrationSettings(samples=args.calibration_samples, seq_len=args.calibration_seq_len,
                                **({"source": args.calibration_file} if args.calibration_file else {}))
    from .convert import from_hugging_face

    model = from_hugging_face(model_dir, dtype=args.dtype, allow_pickle=args.allow_pickle)
    try:
        return quantize_checkpoint(model, args.out, cfg, calibration=calib, target_sm=args.target_sm,
                                   overwrite=args.overwrite, progress=bar)
    finally:
        model.close()


def _report_error(exc: KilnError, bar: ProgressBar | None = None) -> int:
    if bar is not None:
        bar.abort()
    print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    return 2


def _build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .build import BuildConfig, build

    error = _directory_preflight(args.checkpoint, "checkpoint", "kiln build CKPT ENGINE")
    if error is not None:
        return _report_error(error)
    start = time.perf_counter()  # one clock for the bar and the summary line
    bar = None if args.quiet else ProgressBar("build", start=start)
    try:
        bc = BuildConfig(max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                         max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens, dtype=args.dtype,
                         target=args.target, backend=args.backend, use_cuda_graph=not args.no_cuda_graph,
                         measure_performance=not args.no_measure, keep_tensor_parallel=args.keep_tensor_parallel)
        stats = build(args.checkpoint, bc, args.out, overwrite=args.overwrite,
                      progress=bar)
    except KilnError as exc:
        return _report_error(exc, bar)
    total = bar.finish() if bar is not None else time.perf_counter() - start
    out = Path(args.out).absolute()
    engine = json.loads((out / "config.json").read_text()).get("engine", {})
    perf_file = out / "performance.json"
    perf = json.loads(perf_file.read_text()) if perf_file.is_file() else {}
    summary = {"engine_dir": str(out), "backend": args.backend, "arch": engine.get("arch"),
               "tp_size": engine.get("tp_size", 1), **stats, "seconds": total, "performance": perf}
    if args.json:
        print(json.dumps(summary))
    else:
        rate = perf.get("decode_tokens_per_second_batch_1")
        timing = max(total - stats["build_seconds"], 0.0)
        print(f"built {args.backend} engine ({summary['arch']}, tp={summary['tp_size']}) -> {out}: "
              f"{stats['weights_bytes'] / 1e9:.2f} GB of weights in {total:.1f} s "
              f"(build {stats['build_seconds']:.1f} s" + (f", timing {timing:.1f} s)" if rate else ")")
              + (f": decode {rate:.1f} tok/s at batch 1" if rate else ""))
    return 0


def _generate(args: argparse.Namespace) -> int:
    """One prompt through an engine; a tp engine runs one process per rank (its GPUs, or gloo on the
    CPU) and rank 0's result is printed."""
    from pathlib import Path

    error = _directory_preflight(args.engine_dir, "engine", "kiln generate ENGINE")
    if error is not None:
        return _report_error(error)
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


def _directory_preflight(path: str, want: str, then: str) -> KilnError | None:
    """What makes ``path`` not the kind of directory a command takes, as an error with its hint, or None.

    ``want``: "checkpoint" (TensorRT-LLM checkpoint: kiln convert's output) or "engine" (kiln build's);
    ``then``: the command to suggest after the missing step (e.g. "kiln validate OUT")."""
    from pathlib import Path

    from .errors import InvalidArgument, InvalidCheckpoint

    what = "TensorRT-LLM checkpoint" if want == "checkpoint" else "engine directory"
    a_what = f"a {what}" if want == "checkpoint" else f"an {what}"
    made_by = ("the checkpoint directory that `kiln convert SRC OUT` wrote (OUT)" if want == "checkpoint"
               else "the engine directory that `kiln build CKPT ENGINE` wrote (ENGINE)")
    d = Path(path)
    if not d.exists():
        return InvalidArgument(f"no such directory: {path}", hint=f"pass {made_by}")
    if not d.is_dir():
        return InvalidArgument(f"not a directory: {path}", hint=f"pass {made_by}")
    if not (d / "config.json").is_file():
        return InvalidCheckpoint(f"{path} has no config.json: not {a_what}", hint=f"pass {made_by}")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the command itself reports a malformed config.json
    if not isinstance(cfg, dict):
        return None
    if "architecture" not in cfg and "architectures" in cfg:
        archs = cfg["architectures"]
        arch = archs[0] if isinstance(archs, list) and archs else "?"
        steps = f"kiln convert {path} CKPT" + (", kiln build CKPT ENGINE" if want == "engine" else "")
        return InvalidCheckpoint(f"{path} is a Hugging Face model folder ({arch}), not {a_what}",
                                 hint=f"convert it first: {steps}, then {then}")
    if want == "checkpoint" and "engine" in cfg and "pretrained_config" in cfg:
        return InvalidCheckpoint(f"{path} is an engine directory (kiln build's output), not a TensorRT-LLM checkpoint",
                                 hint=f"pass {made_by}")
    if want == "engine" and "engine" not in cfg and "architecture" in cfg:
        return InvalidCheckpoint(f"{path} is a TensorRT-LLM checkpoint, not an engine directory",
                                 hint=f"build it first: kiln build {path} ENGINE, then {then}")
    return None


def _validate(args: argparse.Namespace) -> int:
    from .checkpoint.validate import validate_checkpoint

    error = _directory_preflight(args.dir, "checkpoint", "kiln validate CKPT")
    if error is not None:
        if args.json:
            print(json.dumps({"checkpoint_dir": args.dir, "ok": False,
                              "error": {"code": error.code, "message": error.message, "hint": error.hint}}, indent=2))
            return 2
        return _report_error(error)
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
        arch = f"{report.architecture}, " if report.architecture else ""
        print(f"{status}: {args.dir} ({arch}{n}/{report.world_size} rank files valid, "
              f"{len(report.errors)} errors, {len(report.warnings)} warnings)")
    return 0 if report.ok else 1


DTYPES = ["auto", "float32", "float16", "bfloat16"]

CONVERT_EXAMPLES = """\
examples:
  kiln convert ./SmolLM2-135M ./ckpt                                  # dtype of the model, one rank
  kiln convert ./my-llama ./ckpt --dtype bfloat16 --tp-size 2 --pp-size 2
  kiln convert meta-llama/Llama-3.2-1B ./ckpt --token-env HF_TOKEN    # a repo id through the HF cache
  kiln convert ./SmolLM2-135M ./ckpt-awq --quantization W4A16_AWQ --group-size 64
  kiln convert ./my-llama ./ckpt-fp8 --quantization FP8 --fast      # max calibration, no GPTQ rounding"""

VALIDATE_EXAMPLES = """\
examples:
  kiln validate ./ckpt            # OK: ./ckpt (LlamaForCausalLM, 4/4 rank files valid, 0 errors, 0 warnings)
  kiln validate ./ckpt --strict --json

DIR is a TensorRT-LLM checkpoint (kiln convert's output), not a Hugging Face folder:
run `kiln convert HF_DIR DIR` first."""

BUILD_EXAMPLES = """\
examples:
  kiln build ./ckpt ./engine --target cpu
  kiln build ./ckpt ./engine --max-batch-size 4 --max-input-len 256 --max-seq-len 512 --dtype bfloat16
  kiln build ./ckpt-tp2 ./engine-tp2 --keep-tensor-parallel --target h100"""

GENERATE_EXAMPLES = """\
examples:
  kiln generate ./engine --prompt "The capital of France is" --max-new-tokens 12
  kiln generate ./engine --ids 1,50,900 --temperature 0.8 --top-p 0.9 --seed 0 --json"""


def register(sub: argparse._SubParsersAction) -> None:
    from .models import supported_hf_architectures

    raw = HelpFormatter
    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face model into a TensorRT-LLM checkpoint (optionally quantized)",
        description="Convert a HF model folder, cached repo id, Meta consolidated folder or GGUF file into config.json + rank{N}.safetensors "
        "(one file per tp x pp rank).\n\nSupported architectures: " + ", ".join(supported_hf_architectures()) + ".",
        epilog=CONVERT_EXAMPLES, formatter_class=raw,
    )
    p.add_argument("src", help="local HF model folder, a Meta consolidated folder (params.json + "
                   "consolidated.NN.pth), a llama.cpp .gguf file, or a repo id resolved through the HF cache")
    p.add_argument("out", help="output checkpoint directory (written atomically)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype of the written weights; auto (default) keeps the model's torch_dtype")
    p.add_argument("--tp-size", type=int, default=1, metavar="N",
                   help="tensor-parallel ranks: each layer's weights split N ways (default 1)")
    p.add_argument("--pp-size", type=int, default=1, metavar="N",
                   help="pipeline-parallel stages: the layers split into N consecutive groups (default 1); "
                   "tp-size x pp-size rank files are written")
    p.add_argument("--moe-ep-size", type=int, default=None, metavar="N",
                   help="Mixture-of-Experts models: expert parallelism inside the tp ranks (TensorRT-LLM's "
                   "moe_ep_size; each rank holds num_experts/N experts, each cut tp-size/N ways; default: "
                   "experts are not distributed, every rank holds a 1/tp-size slice of every expert)")
    p.add_argument("--pp-split", default="even", choices=["even", "balanced"],
                   help="pipeline stages: TensorRT-LLM's even split (default) or Kiln's cost-balanced split "
                   "(weight bytes, FLOPs and KV-cache bytes per layer; runs on Kiln's engine only)")
    p.add_argument("--revision", default=None, help="repo revision (with a repo id)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="HF cache folder (default: huggingface_hub's)")
    p.add_argument("--token-env", default=None, metavar="VAR",
                   help="name of the environment variable holding an HF token (the token itself is never "
                   "passed on the command line)")
    p.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept *.bin/*.pt weights (loaded with torch.load(weights_only=True))")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="threads producing tensors (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    q = p.add_argument_group("quantization (needs --tp-size 1 --pp-size 1)")
    q.add_argument("--quantization", default=None, metavar="ALGO",
                   help="FP8, FP8_PER_CHANNEL_PER_TOKEN, W8A16, W4A16, W4A16_AWQ or W8A8_SQ_PER_CHANNEL")
    q.add_argument("--kv-cache-quantization", default=None, metavar="ALGO", help="INT8 or FP8 (calibrated)")
    q.add_argument("--group-size", type=int, default=128, metavar="N",
                   help="W4A16_AWQ group size (must divide in-features; default 128)")
    q.add_argument("--has-zero-point", action="store_true", help="W4A16_AWQ with zero points (asymmetric)")
    q.add_argument("--smoothquant-alpha", type=float, default=None, metavar="A",
                   help="W8A8_SQ_PER_CHANNEL: fix alpha in [0, 1] (default: per-model search)")
    q.add_argument("--exclude-modules", nargs="*", default=None, metavar="PATTERN",
                   help="fnmatch patterns of modules kept unquantized, added to the defaults (lm_head, ...)")
    q.add_argument("--target-sm", default=None, metavar="SM",
                   help="target GPU compute capability (e.g. sm_89): FP8 needs >= 8.9")
    c = p.add_argument_group("calibration (with --quantization or --kv-cache-quantization)")
    c.add_argument("--calibration-file", default=None, metavar="FILE",
                   help="UTF-8 text the scales are calibrated on (default: bundled English text)")
    c.add_argument("--calibration-samples", type=int, default=128, metavar="N",
                   help="number of calibration sequences (default 128)")
    c.add_argument("--calibration-seq-len", type=int, default=512, metavar="N",
                   help="tokens per calibration sequence (default 512)")
    c.add_argument("--calibration-method", default=None, choices=["gptq", "max"],
                   help="FP8 only: gptq (default: max-calibrated scales, GPTQ-rounded E4M3 weights, the "
                   "accurate one) or max (ModelOpt's plain max calibration, weights rounded to nearest: "
                   "several times faster, less accurate)")
    c.add_argument("--fast", action="store_true", help="FP8's fast path: same as --calibration-method max")
    p.set_defaults(func=_convert)

    v = sub.add_parser("validate", help="check a TensorRT-LLM checkpoint's rank files against its config.json",
                       description="Check that every rank file holds the tensors (names, shapes, dtypes) "
                       "its config.json implies.", epilog=VALIDATE_EXAMPLES, formatter_class=raw)
    v.add_argument("dir", help="TensorRT-LLM checkpoint directory (kiln convert's output)")
    v.add_argument("--strict", action="store_true", help="unexpected tensors are errors (default: warnings)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=_validate)

    b = sub.add_parser("build", help="build an engine from a TensorRT-LLM checkpoint (trtllm-build's main knobs)",
                       description="Build an engine directory (config.json with version / pretrained_config / "
                       "build_config, per-rank engine files, compile cache, performance.json). Limits are "
                       "checked against the model and the target's memory before anything is written.",
                       epilog=BUILD_EXAMPLES, formatter_class=raw)
    b.add_argument("checkpoint", help="checkpoint directory (kiln convert's output)")
    b.add_argument("out", help="engine directory (written atomically)")
    b.add_argument("--backend", default="torch", help="torch (default), onnx, tensorrt, trtllm (where installed)")
    b.add_argument("--target", default="auto", help="auto (this machine), cpu, a GPU name (h100) or an arch (sm90)")
    b.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype of the engine's weights and activations; auto (default) keeps the checkpoint's")
    b.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="sequences per batch (default 8)")
    b.add_argument("--max-input-len", type=int, default=1024, metavar="N",
                   help="longest prompt in tokens (default 1024)")
    b.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="longest prompt + output in tokens (default: min(model's positions, input + 1024))")
    b.add_argument("--max-num-tokens", type=int, default=None, metavar="N", help="tokens per prefill forward")
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
                                        "per rank)", epilog=GENERATE_EXAMPLES, formatter_class=raw)
    add_generate_arguments(g)
    g.add_argument("--timeout", type=float, default=1800, metavar="S",
                   help="seconds a tp engine's ranks may take (default 1800)")
    g.add_argument("--json", action="store_true", help="print tokens, text and timings as JSON")
    g.set_defaults(func=_generate)

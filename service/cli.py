"""`kiln` command line: one entry point, sub-commands registered by each layer.

Compiler commands (convert, validate, build, generate) come from ``service.compiler.cli``; service
commands (serve, worker, submit, status, watch, download, cancel, workers, compile) from
``service.api.cli``. ``kiln --help`` lists them in two groups: compile and service.

A layer whose *optional extra* is not installed contributes no commands, and ``kiln --help`` says
which commands are unavailable and which extra installs them. Any other import error (a broken
module, a missing core dependency) surfaces: it is a bug, not a configuration.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

# (module, the commands it registers): the table `kiln --help` uses when a module cannot be imported
_COMMAND_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("service.compiler.cli", ("convert", "validate", "build", "generate")),
    ("service.api.cli", ("serve", "worker", "submit", "status", "watch", "download", "cancel", "workers", "compile",
                         "gc")),
)

# How `kiln --help` groups the commands (a command no group names is listed under "other commands").
COMMAND_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("compile commands (on this machine: HF model -> checkpoint -> engine)",
     ("convert", "validate", "build", "generate", "compile")),
    ("service commands (run Kiln's service, or use one at --server)",
     ("serve", "worker", "submit", "status", "watch", "download", "cancel", "workers", "gc")),
)

# Top-level import names of the packages of each optional extra (pyproject.toml
# [project.optional-dependencies]); a ModuleNotFoundError naming one of these means "extra not installed".
OPTIONAL_EXTRAS: dict[str, tuple[str, ...]] = {
    "hf": ("transformers", "gguf", "accelerate", "sentencepiece"),
    "api": ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "grpc", "grpc_health", "grpc_reflection",
            "google", "sqlalchemy", "alembic", "psycopg", "pydantic", "pydantic_settings", "celery", "kombu",
            "fastapi_offline",
            "redis", "httpx"),
    "worker": ("celery", "kombu", "redis", "sqlalchemy", "alembic", "psycopg", "pydantic", "pydantic_settings"),
    "gpu": ("onnx", "onnxruntime"),
}

EXAMPLES = """\
examples:
  kiln convert ./my-llama ./ckpt --dtype bfloat16 --tp-size 2     # HF folder -> TensorRT-LLM checkpoint
  kiln validate ./ckpt                                              # check every rank file
  kiln build ./ckpt ./engine --target cpu                           # checkpoint -> engine
  kiln generate ./engine --prompt "The capital of France is"
  kiln serve                                                        # API + dashboard + one worker
  kiln submit HuggingFaceTB/SmolLM2-135M-Instruct --dtype bfloat16 --watch
  kiln status                                                       # list jobs

`kiln COMMAND --help` describes a command and every option."""


def extra_for(module_name: str | None) -> str | None:
    """The optional extra whose packages include ``module_name``'s top-level package, or None."""
    if not module_name:
        return None
    top = module_name.split(".", 1)[0]
    for extra, packages in OPTIONAL_EXTRAS.items():
        if top in packages:
            return extra
    return None


def package_version() -> str:
    """The installed distribution's version, else the source tree's (pyproject.toml next to service/)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kiln")
    except PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib

        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


@dataclass
class Unavailable:
    """Commands a module would register, skipped because an optional extra is not installed."""

    module: str
    commands: tuple[str, ...]
    missing: str  # the package that did not import
    extra: str

    def line(self) -> str:
        return (f"{', '.join(self.commands)}: need the '{self.extra}' extra (no module {self.missing!r}); "
                f"install it with: pip install 'kiln[{self.extra}]'")


def _formatter() -> type[argparse.HelpFormatter]:
    try:
        from service.compiler.cli import HelpFormatter
    except ImportError:  # the compiler layer is unavailable: its commands are listed as such
        return argparse.RawDescriptionHelpFormatter
    return HelpFormatter


class _KilnParser(argparse.ArgumentParser):
    unavailable: list[Unavailable]


def _command_listing(sub: argparse._SubParsersAction, unavailable: list[Unavailable]) -> str:
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    width = max((len(n) for n in helps), default=8) + 2
    listed: set[str] = set()
    blocks = []
    for title, names in COMMAND_GROUPS:
        rows = [f"  {n:<{width}}{helps[n]}" for n in names if n in helps]
        listed.update(names)
        if rows:
            blocks.append(f"{title}:\n" + "\n".join(rows))
    rest = [f"  {n:<{width}}{h}" for n, h in helps.items() if n not in listed]
    if rest:
        blocks.append("other commands:\n" + "\n".join(rest))
    if unavailable:
        blocks.append("unavailable commands (optional extras not installed):\n"
                      + "\n".join(f"  {u.line()}" for u in unavailable))
    return "\n\n".join(blocks)


def build_parser(modules: tuple[tuple[str, tuple[str, ...]], ...] = _COMMAND_MODULES) -> _KilnParser:
    parser = _KilnParser(
        prog="kiln",
        usage="kiln [-h] [--version] COMMAND [ARGS ...]",
        description="Kiln: compile Hugging Face models into TensorRT-LLM checkpoints and engines, "
        "on this machine or through the Kiln service.",
        epilog=EXAMPLES,
        formatter_class=_formatter(),
    )
    parser.add_argument("--version", action="version", version=f"kiln {package_version()}",
                        help="print kiln's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS, prog="kiln")
    sub.required = True
    parser.unavailable = []
    for name, commands in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            extra = extra_for(exc.name)
            if extra is None:  # a core dependency or one of Kiln's own modules: a broken install or a bug
                raise
            parser.unavailable.append(Unavailable(name, commands, exc.name or "?", extra))
            continue
        module.register(sub)
    parser.description = (parser.description or "") + "\n\n" + _command_listing(sub, parser.unavailable)
    return parser


def _missing_extra_message(command: str, exc: ModuleNotFoundError, extra: str) -> str:
    return (f"kiln {command}: needs the '{extra}' extra (no module {exc.name!r}); "
            f"install it with: pip install 'kiln[{extra}]'")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:  # a newcomer's first try: the commands, not "the following arguments are required"
        parser.print_help(sys.stderr)
        return 2
    if not argv[0].startswith("-"):
        for u in parser.unavailable:
            if argv[0] in u.commands:
                print(f"kiln {argv[0]}: unavailable: {u.line()}", file=sys.stderr)
                return 2
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except ModuleNotFoundError as exc:  # a command's lazily imported extra is not installed
        extra = extra_for(exc.name)
        if extra is None:
            raise
        print(_missing_extra_message(args.command, exc, extra), file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`kiln` command line: one entry point, sub-commands registered by each layer.

Compiler commands (convert, validate, ...) come from ``service.compiler.cli``; service commands
(serve, worker, submit, status, watch, download, cancel, workers, compile) from ``service.api.cli``.
A layer whose optional dependencies are not installed simply contributes no commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = ("service.compiler.cli", "service.api.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln model-compilation toolkit and service")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # optional layer not installed
            if exc.name and exc.name.startswith("service."):
                continue
            if exc.name and not exc.name.startswith("service"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

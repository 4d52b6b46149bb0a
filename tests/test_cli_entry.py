"""`kiln` itself: grouped commands, --version, and which import errors may hide commands."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kiln(*args, env=None):
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def test_help_groups_the_commands_with_one_line_each_and_examples():
    r = kiln("--help")
    assert r.returncode == 0
    out = r.stdout
    compile_at, service_at = out.index("compile commands"), out.index("service commands")
    assert compile_at < service_at
    groups = {"compile": out[compile_at:service_at], "service": out[service_at:out.index("options:")]}
    for group, names in (("compile", ["convert", "validate", "build", "generate", "compile"]),
                         ("service", ["serve", "worker", "submit", "status", "watch", "download", "cancel",
                                      "workers", "gc"])):
        rows = [line.split() for line in groups[group].splitlines()[1:] if line.strip()]
        assert [row[0] for row in rows] == names, (group, rows)
        assert all(len(row) > 2 for row in rows)  # each with its description
    assert "examples:\n  kiln convert " in out and "kiln submit " in out
    assert "unavailable" not in out  # everything is installed here


def test_version_is_the_package_version():
    from importlib.metadata import version

    r = kiln("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"kiln {version('kiln')}"


def _parser_with(tmp_path, module_source: str, blocked: list[str], argv: list[str]):
    """Run build_parser() with one extra command module (written to tmp_path) while ``blocked`` packages
    cannot be imported (``sys.modules[name] = None``, Python's own 'not installed' signal)."""
    (tmp_path / "kiln_extra_cmds.py").write_text(textwrap.dedent(module_source))
    code = textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None
        sys.path.insert(0, {str(tmp_path)!r})
        import service.cli as cli
        parser = cli.build_parser((("kiln_extra_cmds", ("fetch-model", "push-model")),) + cli._COMMAND_MODULES)
        print(parser.format_help())
        print("UNAVAILABLE", [u.commands for u in parser.unavailable])
    """)
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


REGISTERING = """
    {imports}

    def register(sub):
        sub.add_parser("fetch-model", help="fetch a model").set_defaults(func=lambda a: 0)
        sub.add_parser("push-model", help="push a model").set_defaults(func=lambda a: 0)
"""


def test_a_missing_optional_extra_hides_its_commands_and_help_says_which_extra(tmp_path):
    r = _parser_with(tmp_path, REGISTERING.format(imports="import fastapi"), ["fastapi"], [])
    assert r.returncode == 0, r.stderr
    assert "UNAVAILABLE [('fetch-model', 'push-model')]" in r.stdout
    assert "unavailable commands (optional extras not installed):" in r.stdout
    assert ("fetch-model, push-model: need the 'api' extra (no module 'fastapi'); "
            "install it with: pip install 'kiln[api]'") in " ".join(r.stdout.split())
    assert re.search(r"^\s+convert\s", r.stdout, re.M)  # the other layers' commands are still there


def test_a_broken_import_surfaces_instead_of_hiding_commands(tmp_path):
    # one of Kiln's own modules is broken: today's loader skipped it silently
    r = _parser_with(tmp_path, REGISTERING.format(imports="from service.compiler import no_such_name"), [], [])
    assert r.returncode != 0
    assert "ImportError: cannot import name 'no_such_name' from 'service.compiler'" in r.stderr
    # a core dependency (numpy is not an optional extra) is missing: also an error, not a smaller CLI
    r = _parser_with(tmp_path, REGISTERING.format(imports="import numpy"), ["numpy"], [])
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr and "numpy" in r.stderr


def test_the_extras_table_covers_the_extras_in_pyproject():
    import tomllib

    from service.cli import OPTIONAL_EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {e for e in extras if e != "dev"} == set(OPTIONAL_EXTRAS)
    import_names = {"grpcio": "grpc", "grpcio-health-checking": "grpc_health", "grpcio-reflection": "grpc_reflection",
                    "protobuf": "google", "psycopg[binary]": "psycopg", "celery[redis]": "celery",
                    "pydantic-settings": "pydantic_settings"}
    for extra, reqs in extras.items():
        if extra == "dev":
            continue
        for req in reqs:
            dist = re.split(r"[<>=!~; ]", req, maxsplit=1)[0]
            assert import_names.get(dist, dist.replace("-", "_")) in OPTIONAL_EXTRAS[extra], (extra, dist)


def test_kiln_alone_prints_the_commands():
    r = kiln()
    assert r.returncode == 2
    assert "compile commands" in r.stderr and "service commands" in r.stderr
    assert "the following arguments are required" not in r.stderr

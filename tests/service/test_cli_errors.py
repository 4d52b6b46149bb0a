"""`kiln` client commands when the server is down or refuses: one line naming the URL and the fix, the
server's code / message / hint, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.cli import main

from .harness import ROOT

CLIENT_COMMANDS = [
    ["status"], ["status", "0123456789abcdef"], ["watch", "0123456789abcdef"], ["download", "0123456789abcdef", "OUT"],
    ["cancel", "0123456789abcdef"], ["workers"], ["submit", "HuggingFaceTB/SmolLM2-135M-Instruct"],
]


@pytest.fixture
def dead_url():
    """A loopback port bound but not listening: every connection is refused, and no one else can take it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def test_status_with_no_server_is_one_line_with_the_fix_not_a_traceback(dead_url):
    r = subprocess.run([sys.executable, "-m", "service.cli", "status", "--server", dead_url], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "ConnectError" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"kiln status: cannot reach the Kiln server at {dead_url}: ")
    assert lines[0].endswith("start it with `kiln serve` or set KILN_SERVER / --server")


@pytest.mark.parametrize("argv", CLIENT_COMMANDS, ids=lambda a: a[0] + ("-job" if len(a) > 1 else ""))
def test_every_client_command_says_the_server_is_unreachable(argv, dead_url, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    rc = main([*argv, "--server", dead_url])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"kiln {argv[0]}: cannot reach the Kiln server at {dead_url}" in err
    assert "kiln serve" in err and "KILN_SERVER / --server" in err


def test_the_server_url_from_kiln_server_is_the_one_named(dead_url, monkeypatch, capsys):
    monkeypatch.setenv("KILN_SERVER", dead_url)
    assert main(["workers"]) == 1
    assert f"cannot reach the Kiln server at {dead_url}" in capsys.readouterr().err


def test_a_bad_server_url_says_how_to_write_one(capsys):
    assert main(["status", "--server", "ftp://kiln.example"]) == 1
    err = capsys.readouterr().err
    assert "kiln status: bad server URL at ftp://kiln.example" in err and "http:// or https://" in err


class _NotKiln(BaseHTTPRequestHandler):
    """Another web server on the port --server names (a real HTTP server, not Kiln)."""

    def do_GET(self):
        body = b"<html><body><h1>Not Found</h1></body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def not_kiln_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NotKiln)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("argv", [["status", "0123456789abcdef"], ["watch", "0123456789abcdef"],
                                  ["submit", "HuggingFaceTB/SmolLM2-135M-Instruct"]], ids=lambda a: a[0])
def test_a_non_kiln_answer_is_described_not_dumped(argv, not_kiln_url, capsys):
    rc = main([*argv, "--server", not_kiln_url])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"kiln {argv[0]}: HTTP 404 http_404: Not Found (not a Kiln error response: text/html)" in err
    assert "<html>" not in err and "Traceback" not in err
    assert "hint: " in err and "KILN_SERVER" in err


def test_local_mistakes_are_not_reported_as_an_unreachable_server(dead_url, tmp_path, capsys):
    assert main(["submit", "--spec", str(tmp_path / "nope.json"), "--server", dead_url]) == 2
    err = capsys.readouterr().err
    assert "kiln submit: cannot read --spec" in err and "cannot reach" not in err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["submit", "--spec", str(tmp_path / "bad.json"), "--server", dead_url]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["submit", "m/x", "--label", "team", "--server", dead_url]) == 2
    assert "--label takes KEY=VALUE, got 'team'" in capsys.readouterr().err
    assert main(["submit", "--server", dead_url]) == 2
    assert "give a model (Hugging Face repo id), --gguf PATH, --meta PATH or --spec FILE" in capsys.readouterr().err


def test_a_missing_extra_at_run_time_names_the_extra():
    code = ("import sys; sys.modules['httpx'] = None\n"  # the api extra is not installed
            "from service.cli import main\n"
            "sys.exit(main(['status', '--server', 'http://127.0.0.1:9']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "kiln status: needs the 'api' extra (no module 'httpx'); install it with: pip install 'kiln[api]'" in r.stderr

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


class _LossyProxy:
    """A TCP proxy in front of a real `kiln serve`: the first ``drop`` connections carry their request to the
    server and then lose its answer (the client's socket is closed once the server has answered), as when a
    keep-alive connection or the server dies on the way back. Later connections are piped through."""

    def __init__(self, upstream_port: int, drop: int = 1):
        self.upstream, self.drop, self.connections = upstream_port, drop, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client, self.connections <= self.drop), daemon=True).start()

    def _serve(self, client, lose_answer: bool):
        upstream = socket.create_connection(("127.0.0.1", self.upstream))

        def pump(src, dst, answer: bool):
            try:
                while data := src.recv(65536):
                    if answer and lose_answer:
                        return  # the server answered: the client never hears it
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):  # shutdown first: it sends the FIN and wakes the other pump's recv
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()

        threading.Thread(target=pump, args=(client, upstream, False), daemon=True).start()
        pump(upstream, client, True)

    def close(self):
        self.sock.close()


def test_a_submission_whose_answer_is_lost_is_retried_once_and_makes_one_job(server, capsys):
    """The real server gets the submission and creates the job, the answer is lost on the way back; the CLI
    retries with the Idempotency-Key it made, gets the same job, and there is one job, not two."""
    import httpx

    from .conftest import TINY_REPO

    port = int(server["http"].rsplit(":", 1)[1])
    proxy = _LossyProxy(port, drop=1)
    label = f"lost-answer-{proxy.sock.getsockname()[1]}"
    try:
        rc = main(["submit", TINY_REPO, "--label", f"probe={label}", "--server", proxy.url])
    finally:
        proxy.close()
    out = capsys.readouterr()
    assert rc == 0, out.err
    job_id = out.out.strip().splitlines()[-1]
    assert proxy.connections == 2
    jobs = httpx.get(server["http"] + "/v1/jobs", params={"label": f"probe={label}"}).json()["jobs"]
    assert [j["id"] for j in jobs] == [job_id]
    httpx.post(f"{server['http']}/v1/jobs/{job_id}:cancel")


def test_a_request_that_is_not_safe_to_repeat_is_not_retried(server, capsys):
    """`kiln cancel` is a POST without an Idempotency-Key: a lost answer is reported, not sent again."""
    port = int(server["http"].rsplit(":", 1)[1])
    proxy = _LossyProxy(port, drop=1)
    try:
        rc = main(["cancel", "0123456789abcdef", "--server", proxy.url])
    finally:
        proxy.close()
    assert rc == 1 and proxy.connections == 1
    assert "kiln cancel:" in capsys.readouterr().err


def test_503_with_retry_after_is_retried_then_answered(capsys):
    """A server that is briefly not ready (503 + Retry-After, what `kiln serve` answers while its database is
    away) gets the same GET again after the advertised wait; the second answer is used."""
    import time as _time

    seen: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(_time.monotonic())
            if len(seen) == 1:
                body = b'{"error": {"code": "unavailable", "message": "database away", "hint": "retry"}}'
                self.send_response(503)
                self.send_header("Retry-After", "1")
            else:
                body = b'{"workers": []}'
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        rc = main(["workers", "--server", f"http://127.0.0.1:{srv.server_address[1]}"])
    finally:
        srv.shutdown()
    assert rc == 0, capsys.readouterr().err
    assert len(seen) == 2 and seen[1] - seen[0] >= 0.95  # Retry-After: 1 honoured

"""One fresh process per tensor-parallel rank: what the build runs to compile a tp engine's cache
and to time it, and what a rank process calls to join its group.

``run_ranks`` starts ``python ARGS`` (``-m MODULE ...``) once per rank (adding ``--rank/--world-size/
--init-method`` for tp > 1), with output in files (no rank blocks on a full pipe), and stops every
rank as soon as one fails or the deadline passes: a rank that dies leaves the others waiting in a
collective forever. ``join_group`` is the rank side (NCCL on GPUs, gloo on the CPU).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[3])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(args: list[str], tp: int, *, what: str, timeout_s: float, env_extra: dict | None = None) -> list[str]:
    """Run ``python *args`` in ``tp`` processes (one for tp=1; ``env_extra`` added to this process's
    environment); their stdouts, rank order. Raises RuntimeError naming each failed rank (exit code,
    stderr tail), TimeoutError past the deadline; either way no rank is left running."""
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_repo_root(), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, *args]
    if tp > 1:
        cmd += ["--world-size", str(tp), "--init-method", f"tcp://127.0.0.1:{free_port()}"]
    with tempfile.TemporaryDirectory(prefix="kiln-ranks-") as logs:
        outs = [(Path(logs) / f"{r}.out", Path(logs) / f"{r}.err") for r in range(tp)]
        procs = []
        try:
            for r, (out, err) in enumerate(outs):
                with open(out, "w") as fo, open(err, "w") as fe:
                    procs.append(subprocess.Popen(cmd + (["--rank", str(r)] if tp > 1 else []), env=env, stdout=fo,
                                                  stderr=fe, text=True))
            deadline = time.monotonic() + timeout_s
            while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} took longer than {timeout_s:.0f} s")
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        codes = [p.returncode for p in procs]
        if any(codes):
            errs = "\n".join(f"rank {r} (exit {c}): {outs[r][1].read_text()[-3000:]}" for r, c in enumerate(codes) if c)
            raise RuntimeError(f"{what} failed:\n{errs}")
        return [out.read_text() for out, _ in outs]


def add_rank_arguments(parser) -> None:
    """The ``--rank/--world-size/--init-method`` options ``run_ranks`` passes to each rank."""
    parser.add_argument("--rank", type=int, default=0, help="this process's rank (tp engines)")
    parser.add_argument("--world-size", type=int, default=1, help="the engine's tp_size")
    parser.add_argument("--init-method", default=None, help="torch.distributed init method, e.g. tcp://host:port")


def join_group(engine_dir: str | os.PathLike, rank: int, world_size: int, init_method: str | None) -> None:
    """Join the tp group before loading a tp engine: NCCL with this rank's GPU when the engine was
    built for a GPU and one is here, gloo otherwise. A no-op for world_size 1."""
    if world_size == 1:
        return
    import json

    import torch
    import torch.distributed as dist

    config = json.loads((Path(engine_dir) / "config.json").read_text())
    gpu = torch.cuda.is_available() and config["engine"].get("arch") != "cpu"
    if gpu:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world_size, init_method=init_method)
    global _joined
    _joined = True


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_joined = False


def exit_rank(code: int) -> None:
    """End a rank process with ``code``. A process that joined a tp group leaves by ``os._exit`` after
    flushing its output: with torch 2.13's CPU build, gloo sometimes aborts the interpreter's teardown
    ("terminate called without an active exception", exit -6) after every collective and
    ``destroy_process_group`` have finished — 4 of 12 two-rank runs of a plain all_reduce on our CI
    machine — which would fail a build whose work had succeeded. Other processes exit normally."""
    if not _joined:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

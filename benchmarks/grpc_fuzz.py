"""gRPC fuzzing of every Kiln method: random and boundary protobuf messages generated from the message
descriptors (empty, huge and unicode strings, path tricks, negative / huge / boundary ints, NaN / inf doubles,
unknown enum values, repeated and map fields, nested messages down to a depth limit), sent with a valid key,
with another tenant's key and without one. Target: 0 UNKNOWN / INTERNAL statuses.

    PYTHONPATH=. .venv/bin/python benchmarks/grpc_fuzz.py --messages 2000 --seed 1
    PYTHONPATH=. .venv/bin/python benchmarks/grpc_fuzz.py --target 127.0.0.1:50051 --key KEY   # a running server

Without ``--target`` it starts an in-process gRPC server over a fresh storage (SQLite) holding one finished
job (a tiny random Llama converted by the real pipeline), so every method has real ids, artifacts and cursors
to hit. Prints one table: messages, statuses by code, p50 / p99 / max latency, and the UNKNOWN/INTERNAL count
(exit 1 when it is not 0). ``tests/service/test_grpc_fuzz.py`` runs a seeded few hundred of the same messages.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

STRINGS = ["", " ", "a", "\x00", "../../etc/passwd", "/etc/passwd", "..%2f..%2fkiln.db", "checkpoint", "config.json",
           "rank0.safetensors", "%00", "\\..\\", "ü" * 300, "🔥" * 100, "\u202eevil", "a" * 5000, "A" * 70_000,
           "org/model", "HuggingFaceTB/SmolLM2-135M-Instruct", "queued", "succeeded", "x=y", "=", "W8A16", "FP8",
           "torch", "sm90", "cpu", "float16", "bfloat16", "balanced", "http://127.0.0.1/h", "https://example.com/h",
           "MTIzNDU2Nzg5MC4wfGFiYw==", "bad cursor!", "null", "{}", "' OR 1=1 --"]
INT32 = [0, 1, -1, 2, 7, 64, 65, 4096, 8192, 131072, 2**31 - 1, -2**31]
INT64 = INT32 + [2**63 - 1, -2**63, 2**40]
DOUBLES = [0.0, -0.0, 0.5, 1.0, -1.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf]
MAX_DEPTH = 4


@dataclass
class Generator:
    rng: random.Random
    known: dict[str, list[str]] = field(default_factory=dict)  # field name -> real values (ids, names, cursors)
    huge: bool = True  # include multi-megabyte strings (over the 4 MiB receive cap)

    def string(self, name: str) -> str:
        r = self.rng.random()
        if self.known.get(name) and r < 0.35:
            return self.rng.choice(self.known[name])
        if self.huge and r > 0.995:
            return "x" * (5 << 20)  # over the server's 4 MiB receive cap: RESOURCE_EXHAUSTED, never INTERNAL
        if r > 0.8:
            n = self.rng.choice([1, 8, 64, 300, 4097])
            return "".join(chr(self.rng.choice([self.rng.randrange(32, 127), self.rng.randrange(0xA0, 0xD7FF),
                                                self.rng.randrange(0xE000, 0x10FFFF)])) for _ in range(n))
        return self.rng.choice(STRINGS)

    def scalar(self, f: FieldDescriptor):
        t = f.type
        if t == FieldDescriptor.TYPE_STRING:
            return self.string(f.name)
        if t == FieldDescriptor.TYPE_BYTES:
            return self.rng.randbytes(self.rng.choice([0, 1, 100]))
        if t == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return self.rng.choice(DOUBLES) if self.rng.random() < 0.7 else self.rng.uniform(-1e6, 1e6)
        if t == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers are legal on the wire
            return self.rng.choice([v.number for v in f.enum_type.values] + [999, -1])
        wide = t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64)
        unsigned = t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
                         FieldDescriptor.TYPE_FIXED64)
        value = self.rng.choice(INT64 if wide else INT32) if self.rng.random() < 0.7 else self.rng.randrange(-10**6, 10**6)
        return abs(value) % (2**32) if unsigned else value

    def fill(self, msg, depth: int = 0):
        for f in msg.DESCRIPTOR.fields:
            if self.rng.random() < 0.25:
                continue  # left unset
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                entries = getattr(msg, f.name)
                value_field = f.message_type.fields_by_name["value"]
                for _ in range(self.rng.choice([0, 1, 3, 20])):
                    key = self.string("label_key")[:300]
                    if value_field.message_type is None:
                        entries[key] = self.scalar(value_field)
                continue
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= MAX_DEPTH or f.message_type.full_name.startswith("google.protobuf."):
                    continue
                if f.is_repeated:
                    for _ in range(self.rng.choice([0, 1, 3])):
                        self.fill(getattr(msg, f.name).add(), depth + 1)
                else:
                    self.fill(getattr(msg, f.name), depth + 1)
                    if self.rng.random() < 0.1:
                        getattr(msg, f.name).SetInParent()  # present but empty
                continue
            if f.is_repeated:
                getattr(msg, f.name).extend(self.scalar(f) for _ in range(self.rng.choice([0, 1, 5, 100])))
            else:
                setattr(msg, f.name, self.scalar(f))
        return msg


@dataclass
class Stats:
    codes: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # UNKNOWN / INTERNAL, with the method and the error
    by_method: Counter = field(default_factory=Counter)

    def add(self, method: str, code: str, seconds: float, detail: str = "") -> None:
        self.codes[code] += 1
        self.by_method[method] += 1
        self.latencies.append(seconds)
        if code in ("UNKNOWN", "INTERNAL"):
            self.bad.append(f"{method}: {code} {detail[:300]}")

    def quantile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

    def table(self) -> str:
        rows = [f"| messages | {sum(self.codes.values())} |", f"| methods | {len(self.by_method)} |"]
        rows += [f"| status {code} | {n} |" for code, n in sorted(self.codes.items())]
        rows += [f"| p50 latency | {self.quantile(0.5) * 1000:.1f} ms |", f"| p99 latency | {self.quantile(0.99) * 1000:.1f} ms |",
                 f"| max latency | {max(self.latencies, default=0) * 1000:.1f} ms |",
                 f"| UNKNOWN + INTERNAL | {len(self.bad)} |"]
        return "| figure | value |\n| --- | --- |\n" + "\n".join(rows)


async def fuzz(target: str, messages: int, seed: int, keys: list[str | None], known: dict[str, list[str]],
               stream_timeout: float = 0.5, huge: bool = True) -> Stats:
    """``messages`` calls spread over every method of kiln.v1.Kiln, each with one of ``keys`` (None: no key)."""
    import grpc

    from service.api.grpc_server import pb2

    service = pb2.DESCRIPTOR.services_by_name["Kiln"]
    rng = random.Random(seed)
    gen = Generator(rng, known, huge)
    stats = Stats()
    methods = list(service.methods)
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 16 << 20)]) as channel:
        for i in range(messages):
            method = methods[i % len(methods)]
            request = gen.fill(getattr(pb2, method.input_type.name)())
            key = rng.choice(keys)
            md = (("authorization", f"Bearer {key}"),) if key else ()
            path = f"/{service.full_name}/{method.name}"
            call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(
                path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=lambda b: b)
            start = time.perf_counter()
            try:
                if method.server_streaming:
                    async for _ in call(request, metadata=md, timeout=stream_timeout):
                        pass
                else:
                    await call(request, metadata=md, timeout=10)
                stats.add(method.name, "OK", time.perf_counter() - start)
            except grpc.aio.AioRpcError as err:
                stats.add(method.name, err.code().name, time.perf_counter() - start, err.details() or "")
    return stats


def finished_job_runtime(root: Path, keys: str | None = None, model_dir: Path | None = None):
    """A service over ``root`` with one finished job of tenant ``alice`` (``model_dir``, default a tiny random
    Llama made here, converted by the real pipeline) and one queued job. The caller sets HF_HUB_OFFLINE=1."""
    from service.api.wiring import build_runtime
    from service.domain import JobSpec
    from service.settings import Settings
    from service.workers.pipeline import PipelineRunner
    from tests.hostile import make_tiny_llama

    settings = Settings(storage=root, api_keys=keys or "alice:alice-key,bob:bob-key")
    from service.compiler.sources.smollm2 import install_into_hf_cache

    install_into_hf_cache(model_dir or make_tiny_llama(root / "tiny"), settings.hf_cache, repo_id="kiln-test/tiny-llama")
    runtime = build_runtime(settings)
    svc = runtime.service
    job, _ = svc.submit("alice", JobSpec(model="kiln-test/tiny-llama", dtype="float16"))
    PipelineRunner(settings, svc.store, svc.artifacts, "inproc").run(job.id)
    svc.store.create(tenant="alice", spec=JobSpec(model="org/m"), idempotency_key=None, queue="cpu")
    known = {"id": [job.id], "job_id": [job.id], "name": ["checkpoint"], "path": ["config.json", "rank0.safetensors"],
             "cursor": [svc.list("alice", limit=1)[1] or ""], "model": ["kiln-test/tiny-llama"]}
    return settings, runtime, known


async def _local(messages: int, seed: int) -> Stats:
    from service.api.grpc_server import create_server

    with tempfile.TemporaryDirectory() as tmp:
        settings, runtime, known = finished_job_runtime(Path(tmp))
        server, port = await create_server(runtime.service, settings, port=0, host="127.0.0.1")
        await server.start()
        try:
            return await fuzz(f"127.0.0.1:{port}", messages, seed, ["alice-key", "alice-key", "bob-key", None], known)
        finally:
            await server.stop(None)
            runtime.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--target", help="host:port of a running kiln gRPC server (default: an in-process one)")
    ap.add_argument("--key", action="append", default=[], help="API key(s) for --target (repeatable)")
    args = ap.parse_args(argv)
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"  # the in-process service resolves its tiny model from its own cache
    start = time.perf_counter()
    if args.target:
        stats = asyncio.run(fuzz(args.target, args.messages, args.seed, [*args.key, None], {}))
    else:
        stats = asyncio.run(_local(args.messages, args.seed))
    print(stats.table())
    print(f"\n{time.perf_counter() - start:.1f} s; by method: {dict(stats.by_method)}")
    for line in stats.bad[:20]:
        print("BAD", line, file=sys.stderr)
    return 1 if stats.bad else 0


if __name__ == "__main__":
    sys.exit(main())

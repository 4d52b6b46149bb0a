"""A seeded short gRPC fuzz run (``benchmarks/grpc_fuzz.py`` has the long one and its table): a few hundred
random and boundary messages generated from the message descriptors, spread over every method of
kiln.v1.Kiln, with alice's key, bob's key and no key, against a real in-process gRPC server whose store holds
a finished job (so real ids, artifact names, paths and cursors are in the mix). 0 UNKNOWN / INTERNAL."""

from __future__ import annotations

import asyncio
import time

from benchmarks.grpc_fuzz import finished_job_runtime, fuzz


def test_grpc_fuzz_has_no_unknown_or_internal_status(tmp_path, tiny_model_dir, monkeypatch):
    from service.api.grpc_server import create_server, pb2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings, runtime, known = finished_job_runtime(tmp_path, model_dir=tiny_model_dir)

    async def run():
        server, port = await create_server(runtime.service, settings, port=0, host="127.0.0.1")
        await server.start()
        try:
            return await fuzz(f"127.0.0.1:{port}", 320, seed=20261203, keys=["alice-key", "alice-key", "bob-key", None],
                              known=known, huge=False)
        finally:
            await server.stop(None)

    start = time.perf_counter()
    try:
        stats = asyncio.run(run())
    finally:
        runtime.close()
    print(stats.table())
    assert not stats.bad, "\n".join(stats.bad)
    assert set(stats.by_method) == {m.name for m in pb2.DESCRIPTOR.services_by_name["Kiln"].methods}
    assert {"OK", "NOT_FOUND", "INVALID_ARGUMENT", "UNAUTHENTICATED"} <= set(stats.codes), stats.codes
    assert time.perf_counter() - start < 30

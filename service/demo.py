"""`make demo`: the embedded service compiles the real SmolLM2-135M-Instruct end to end.

Starts ``kiln serve`` (API + gRPC + one worker, SQLite, file-backed broker, storage ./.kiln or
$KILN_STORAGE, loopback), installs SmolLM2 into the service's HF cache (no network: HF_HUB_OFFLINE=1),
submits ``HuggingFaceTB/SmolLM2-135M-Instruct`` (bfloat16, tp 1, torch engine built for the CPU,
evaluated against the reference runtime) over REST, follows it to the end, then prints where the
checkpoint, the engine and the report are, with checksums (verified) and the evaluation's figures.
``--convert-only`` submits the conversion alone. Exit status 0 only on success.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    import httpx

    convert_only = "--convert-only" in (sys.argv[1:] if argv is None else argv)

    from service.compiler.sources.smollm2 import install_into_hf_cache, smollm2_hf_dir
    from service.settings import Settings

    settings = Settings()
    storage = settings.storage_root
    storage.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print("[demo] preparing SmolLM2-135M-Instruct (built once from the bundled GGUF) ...", flush=True)
    snapshot = install_into_hf_cache(smollm2_hf_dir(), settings.hf_cache, repo_id=REPO)
    print(f"[demo] HF cache entry: {snapshot}", flush=True)

    port, grpc_port = _free_port(8080), _free_port(50051)
    env = dict(os.environ, HF_HUB_OFFLINE="1", KILN_STORAGE=str(storage))
    log_path = storage / "demo-serve.log"
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--grpc-port", str(grpc_port)],
                              env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, timeout=30)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                print(f"[demo] server exited early; see {log_path}", file=sys.stderr)
                return 1
            try:
                if http.get("/v1/workers").json().get("workers"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                print(f"[demo] no worker came up in 120 s; see {log_path}", file=sys.stderr)
                return 1
            time.sleep(0.3)
        print(f"[demo] kiln serve is up: REST {base} (dashboard {base}/dashboard/), gRPC 127.0.0.1:{grpc_port}", flush=True)

        spec = {"model": REPO, "dtype": "bfloat16", "mapping": {"tp_size": 1, "pp_size": 1}, "labels": {"source": "demo"}}
        if not convert_only:  # + ~30 s on 2 CPU cores: a CPU torch engine, evaluated against the reference runtime
            spec["build"] = {"backend": "torch", "target": "cpu", "max_batch_size": 4, "max_input_len": 256,
                             "max_seq_len": 512}
            spec["evaluation"] = {"max_samples": 4, "seq_len": 128, "max_new_tokens": 16}
        resp = http.post("/v1/jobs", json=spec)
        if resp.status_code != 202:
            print(f"[demo] submit refused: HTTP {resp.status_code} {resp.text}", file=sys.stderr)
            return 1
        job_id = resp.json()["id"]
        print(f"[demo] submitted job {job_id}: POST /v1/jobs {json.dumps(spec)}", flush=True)

        job, last = None, ""
        with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(30, read=900)) as events:
            for line in events.iter_lines():
                if line.startswith("data: {\""):
                    job = json.loads(line[6:])
                    text = f"{job['state']:<9} {100 * job['progress']:5.1f}%  {job['stage'] or ''} {job['message'][:70]}"
                    if text != last:
                        print(f"[demo]   {text}", flush=True)
                        last = text
        if job is None or job["state"] != "succeeded":
            print(f"[demo] job ended {job and job['state']}: {job and job['error']}", file=sys.stderr)
            return 1
        for stage in job["stages"]:
            hit = " (cache hit)" if stage["cache_hit"] else ""
            print(f"[demo]   stage {stage['name']:<8} {stage['seconds'] or 0:6.2f} s{hit}")
        ok = True
        for art in http.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]:
            where = storage / "stages" / art["stage"] / art["key"]
            print(f"[demo] artifact '{art['name']}' ({art['bytes'] / 2**20:.1f} MiB) is at {where}")
            print(f"[demo]   download: {base}/v1/jobs/{job_id}/artifacts/{art['name']}.tar  or  kiln download {job_id} ./out")
            for f in art["files"]:
                verified = _sha256(where / f["path"]) == f["sha256"]
                ok &= verified
                print(f"[demo]   sha256 {f['sha256']}  {f['size']:>11}  {f['path']}  {'verified' if verified else 'MISMATCH'}")
        evaluation = http.get(f"/v1/jobs/{job_id}/report").json().get("evaluation")
        if evaluation and evaluation.get("engine"):
            e = evaluation["engine"]
            perf = e.get("performance") or {}
            print(f"[demo] engine vs reference runtime ({evaluation['data']['samples']} x {evaluation['data']['seq_len']} "
                  f"tokens, {e['device']}): top-1 agreement {100 * e['top1_agreement']:.1f}%, max |logit error| "
                  f"{e['max_abs_logit_error']:.3g}, perplexity {e['perplexity']:.2f} vs {e['perplexity_reference']:.2f}, "
                  f"ROUGE-1 {e['rouge1']:.3f}, greedy identical {100 * e['greedy_identical']:.0f}%, "
                  f"load {perf.get('load_seconds')} s -> {'PASSED' if evaluation['passed'] else 'FAILED'}")
            print(f"[demo] report.html: {base}/v1/jobs/{job_id}/artifacts/report/files/report.html")
        print(f"[demo] report: {base}/v1/jobs/{job_id}/report   total {time.perf_counter() - t0:.1f} s")
        return 0 if ok else 1
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())

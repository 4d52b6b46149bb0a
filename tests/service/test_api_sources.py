"""Jobs whose model is a GGUF file or a Meta folder on the shared storage, through the real API.

The session's ``kiln serve`` (REST + gRPC + a Celery worker) reads ``source: {"kind": "gguf" |
"meta", "path": ...}`` relative to its sources root (``<storage>/sources`` by default); the tiny
files are written there by the test. Paths that leave the root (``..``, absolute, a symlink out)
are refused at submit, over both protocols, and nothing runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from service.domain.spec import JobSpec

from .conftest import TINY_REPO
from .test_api_scenarios import ApiError, Grpc, Rest

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def sources(server):
    """Tiny GGUF (Qwen2: Q8_0 / Q4_0 / Q5_1 / K-quants) and Meta (2 shards) models under the sources root."""
    from tests.gguf_files import FAMILIES, write_gguf

    root = server["root"] / "storage" / "sources"
    (root / "tiny").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = FAMILIES["qwen2"](transformers).eval()
    write_gguf(model, "qwen2", root / "tiny" / "qwen2.gguf", np.random.default_rng(0))
    _write_meta(root / "tiny-meta")
    outside = server["root"] / "outside.gguf"
    outside.write_bytes((root / "tiny" / "qwen2.gguf").read_bytes())
    (root / "escape.gguf").symlink_to(outside)
    return root


def _write_meta(folder):
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=192, vocab_size=96, tie_word_embeddings=False)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg)
    from tests.meta_files import write_meta_checkpoint

    write_meta_checkpoint(model, {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96,
                                  "multiple_of": 32, "norm_eps": 1e-5}, folder, shards=2, embed_dim=0)


@pytest.fixture(params=["rest", "grpc"])
def api(request, server):
    return Rest(server["http"]) if request.param == "rest" else Grpc(server["grpc"])


def test_gguf_source_job_converts_and_publishes(api, sources, tmp_path):
    spec = {"source": {"kind": "gguf", "path": "tiny/qwen2.gguf"}, "dtype": "float32",
            "mapping": {"tp_size": 2}, "labels": {"via": f"gguf-{api.name}"}}
    job_id, created = api.submit(spec)
    assert created
    assert api.watch(job_id)[-1] == "succeeded", api.get(job_id)
    job = api.get(job_id)
    assert job["spec"]["model"] == "gguf/qwen2.gguf" and job["spec"]["source"]["path"] == "tiny/qwen2.gguf"
    files = api.download(job_id, tmp_path)
    assert {"config.json", "rank0.safetensors", "rank1.safetensors"} <= set(files)
    assert all(got == want for got, want in files.values())


def test_gguf_job_checkpoint_equals_the_compilers(sources, server, tmp_path):
    """The published checkpoint is the one `kiln convert` writes from the same file."""
    import httpx

    from service.compiler import convert_checkpoint

    http = httpx.Client(base_url=server["http"], timeout=30)
    r = http.post("/v1/jobs", json={"source": {"kind": "gguf", "path": "tiny/qwen2.gguf"}, "dtype": "float32"})
    assert r.status_code in (200, 201, 202), r.text
    job_id = r.json()["id"]
    from .harness import wait_for

    job = wait_for(lambda: (j := http.get(f"/v1/jobs/{job_id}").json())["state"] in ("succeeded", "failed") and j,
                   timeout=120, what="the gguf job")
    assert job["state"] == "succeeded", job
    rank0 = http.get(f"/v1/jobs/{job_id}/artifacts/checkpoint/files/rank0.safetensors")
    assert rank0.status_code == 200
    (tmp_path / "job.safetensors").write_bytes(rank0.content)
    convert_checkpoint(sources / "tiny" / "qwen2.gguf", tmp_path / "local", dtype="float32")
    ours, theirs = load_file(tmp_path / "job.safetensors"), load_file(tmp_path / "local" / "rank0.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    cfg = json.loads(http.get(f"/v1/jobs/{job_id}/artifacts/checkpoint/files/config.json").content)
    assert cfg["architecture"] == "Qwen2ForCausalLM"


def test_meta_source_job_succeeds(api, sources):
    job_id, _ = api.submit({"source": {"kind": "meta", "path": "tiny-meta"}, "dtype": "float32",
                            "labels": {"via": f"meta-{api.name}"}})
    assert api.watch(job_id)[-1] == "succeeded", api.get(job_id)
    assert api.get(job_id)["artifacts"] == ["checkpoint"]


@pytest.mark.parametrize("source,code", [
    ({"kind": "gguf", "path": "../outside.gguf"}, "invalid_argument"),
    ({"kind": "gguf", "path": "/etc/passwd.gguf"}, "invalid_argument"),
    ({"kind": "gguf", "path": "escape.gguf"}, "unsafe_weights"),        # a symlink out of the root
    ({"kind": "gguf", "path": "tiny/missing.gguf"}, "model_not_found"),
    ({"kind": "meta", "path": "tiny"}, "model_not_found"),              # a folder, but not a Meta checkpoint
    ({"kind": "gguf", "path": "tiny-meta"}, "invalid_argument"),        # a gguf path must name a .gguf file
    ({"kind": "hf", "path": "tiny/qwen2.gguf"}, "invalid_argument"),
])
def test_paths_outside_the_sources_root_or_of_the_wrong_kind_are_refused(api, sources, source, code):
    with pytest.raises(ApiError) as err:
        api.submit({"source": source, "labels": {"via": "refused"}})
    assert err.value.code in (code, "client_parse"), err.value
    assert api.list(via="refused") == []


def test_hf_source_object_is_the_repo_id(api):
    job_id, _ = api.submit({"source": {"kind": "hf", "repo": TINY_REPO}, "dtype": "float16", "labels": {"via": "hfsrc"}})
    job = api.get(job_id)
    assert job["spec"]["model"] == TINY_REPO and not job["spec"].get("source")
    assert api.watch(job_id)[-1] == "succeeded"


def test_spec_canonical_forms():
    a = JobSpec.model_validate({"source": {"kind": "hf", "repo": "org/name", "revision": "v1"}})
    b = JobSpec.model_validate({"model": "org/name", "revision": "v1"})
    assert a.digest() == b.digest() and "source" not in a.normalized()
    g = JobSpec.model_validate({"source": {"kind": "gguf", "path": "a/model.Q4_0.gguf"}})
    assert g.model == "gguf/model.Q4_0.gguf" and g.is_local_source
    assert JobSpec.model_validate_json(g.model_dump_json()) == g
    for bad in ({"source": {"kind": "gguf", "path": "a/.hidden.gguf"}}, {"source": {"kind": "meta"}},
                {"source": {"kind": "gguf", "path": "m.gguf"}, "revision": "main"},
                {"model": "x/y", "source": {"kind": "hf", "repo": "x/z"}}, {}):
        with pytest.raises(ValueError):
            JobSpec.model_validate(bad)


def test_quantized_job_of_a_meta_source_is_refused_at_submit(api, sources):
    with pytest.raises(ApiError) as err:
        api.submit({"source": {"kind": "meta", "path": "tiny-meta"}, "quantization": {"algo": "W8A16"},
                    "labels": {"via": "meta-quant"}})
    assert err.value.code == "invalid_argument"
    assert api.list(via="meta-quant") == []


def test_kiln_submit_gguf_flag(server, sources):
    """`kiln submit --gguf PATH` sends the source object; the job converts the file."""
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "service.cli", "submit", "--gguf", "tiny/qwen2.gguf", "--dtype", "float32",
                        "--label", "via=cli-gguf", "--server", server["http"]], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    job = httpx.get(f"{server['http']}/v1/jobs/{r.stdout.strip()}", timeout=30).json()
    assert job["spec"]["source"] == {"kind": "gguf", "path": "tiny/qwen2.gguf", "repo": None, "revision": None}


def test_openapi_schema_documents_the_source(server):
    import httpx

    schema = httpx.get(f"{server['http']}/openapi.json", timeout=30).json()
    src = schema["components"]["schemas"]["SourceSpec"]
    assert src["properties"]["kind"]["enum"] == ["hf", "meta", "gguf"]
    assert {"repo", "revision", "path"} <= set(src["properties"])
    job = schema["components"]["schemas"]["JobSpec"]
    assert "source" in job["properties"] and "model" not in job.get("required", [])

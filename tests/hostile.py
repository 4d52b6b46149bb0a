"""Hostile model repositories, laid out in a real huggingface_hub cache (blobs + snapshot symlinks + refs).

Shared by tests/compiler/test_hostile_inputs.py (the compiler library) and tests/service/test_hostile_repos.py
(real service jobs). Each ``Case`` starts from a tiny random Llama (made in the test with transformers) and
edits the plain folder (``edit``) and/or the cache entry after it is laid out (``relink``: symlinks out of the
snapshot). ``code`` is the typed error expected (None: the model converts, the hostile part being ignored, as
for an ``auto_map`` next to a supported architecture). Every code-running payload writes the canary file
``CANARY_NAME`` in the directory ``$KILN_TEST_CANARY_DIR`` named when the repo was built, so a test can prove none
ran: pickles (``__reduce__``), ``modeling_*.py`` / ``configuration_*.py`` / ``tokenization_*.py`` on import.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CANARY_NAME = "CANARY"


def canary_dir() -> Path:
    return Path(os.environ["KILN_TEST_CANARY_DIR"])


def canary_code() -> str:
    """Python that writes the canary when imported (the path fixed when the repo is built, so it works in a
    server process too)."""
    return f"open({str(canary_dir() / CANARY_NAME)!r}, 'w').write('ran')\n"


class Evil:
    """Unpickling this writes the canary (a pickle's classic code-execution gadget)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


def make_tiny_llama(out: Path, **overrides) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    cfg.update(overrides)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(out, safe_serialization=True)
    return out


def word_level_tokenizer(folder: Path, entries: int) -> None:
    """A real tokenizers WordLevel tokenizer.json with ``entries`` entries, plus its tokenizer_config.json. The
    words of the calibration text take the highest ids (so a large tokenizer gives large ids), fillers the rest."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers

    from service.compiler.quantization.calibration import bundled_text

    words = list(dict.fromkeys(re.findall(r"\w+", bundled_text()[-200_000:])))[: entries // 2]
    fillers = entries - 1 - len(words)
    vocab = {"[UNK]": 0} | {f"filler{i}": i for i in range(1, fillers + 1)} \
        | {w: fillers + 1 + i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "unk_token": "[UNK]"}))


# -- edits of the plain folder ---------------------------------------------------------------------------------

def config_edit(**values) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(values)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def config_text(text: Callable[[str], str]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / "config.json").write_text(text((d / "config.json").read_text().rstrip()))
    return edit


def pickle_only(d: Path) -> None:
    import torch

    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Evil(str(canary_dir() / CANARY_NAME))}, d / "pytorch_model.bin")


def pickle_beside_safetensors(d: Path) -> None:
    import torch

    torch.save({"x": Evil(str(canary_dir() / CANARY_NAME))}, d / "pytorch_model.bin")


def remote_code(arch: str | None) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                             "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}, trust_remote_code=True)
        if arch:
            cfg["architectures"] = [arch]
        (d / "config.json").write_text(json.dumps(cfg))
        for module in ("modeling_evil.py", "configuration_evil.py"):
            (d / module).write_text(canary_code() + "class EvilForCausalLM: pass\nclass EvilConfig: pass\n")
    return edit


def tokenizer_remote_code(d: Path) -> None:
    word_level_tokenizer(d, 64)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (d / "tokenization_evil.py").write_text(canary_code() + "class EvilTokenizer: pass\n")


def tokenizer_entries(n: int) -> Callable[[Path], None]:
    return lambda d: word_level_tokenizer(d, n)


def tokenizer_text(text: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        word_level_tokenizer(d, 64)
        (d / "tokenizer.json").write_text(text)
    return edit


def safetensors_header(change: Callable[[dict, int, bytes], bytes | None]) -> Callable[[Path], None]:
    """Rewrite model.safetensors: ``change(header, header_len, data)`` edits the header dict in place (returns
    None: re-serialized in front of the same data) or returns the whole new file."""
    def edit(d: Path) -> None:
        f = d / "model.safetensors"
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        whole = change(header, n, raw[8 + n:])
        if whole is None:  # offsets are relative to the data buffer: a longer header moves nothing
            body = json.dumps(header, separators=(",", ":")).encode()
            whole = struct.pack("<Q", len(body)) + body + raw[8 + n:]
        f.write_bytes(whole)
    return edit


def _tensors(header: dict) -> list[dict]:
    return sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])


def _overlap(h, n, data):
    a, b = _tensors(h)[:2]
    span = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + span]


def _negative(h, n, data):
    _tensors(h)[0]["data_offsets"][0] = -4


def _huge(h, n, data):
    t = _tensors(h)[-1]
    t["data_offsets"] = [2**63, 2**63 + t["data_offsets"][1] - t["data_offsets"][0]]


def _past_end(h, n, data):
    t = _tensors(h)[-1]
    span = t["data_offsets"][1] - t["data_offsets"][0]
    t["data_offsets"] = [len(data) + 64, len(data) + 64 + span]


def _shape_mismatch(h, n, data):
    _tensors(h)[0]["shape"][0] *= 2


def _dtype_mismatch(h, n, data):
    _tensors(h)[0]["dtype"] = "F64"


def _huge_shape(h, n, data):
    _tensors(h)[0]["shape"] = [2**40, 2**40]


def _header_longer_than_file(h, n, data):
    return struct.pack("<Q", n + len(data) + 1) + b"{}"


def _not_json(h, n, data):
    body = b"{not json" + b" " * (n - 9)
    return struct.pack("<Q", n) + body + data


def _duplicate_key(h, n, data):
    name, entry = next((k, v) for k, v in h.items() if k != "__metadata__")
    body = json.dumps(h, separators=(",", ":"))[:-1] + "," + json.dumps(name) + ":" + json.dumps(entry) + "}"
    return struct.pack("<Q", len(body)) + body.encode() + data


# -- edits of the cache entry after it is laid out (symlinks) ---------------------------------------------------

def relink(name: str, target: Callable[[Path, Path], str]) -> Callable[[Path, Path], None]:
    """Point snapshot file ``name`` at ``target(snapshot, cache)`` (an absolute or relative link target)."""
    def edit(snapshot: Path, cache: Path) -> None:
        link, where = snapshot / name, target(snapshot, cache)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(where)
    return edit


def other_repo_blob(filename: str, absolute: bool) -> Callable[[Path, Path], str]:
    """A blob of the neighbouring repo ``kiln-test/neighbour`` (install it first: ``install_neighbour``)."""
    def target(snapshot: Path, cache: Path) -> str:
        blob = (cache / "models--kiln-test--neighbour" / "snapshots").glob(f"*/{filename}")
        path = next(blob).resolve()
        return str(path) if absolute else os.path.relpath(path, snapshot)
    return target


def outside_file(snapshot: Path, cache: Path) -> str:
    """A copy of the snapshot's own weights placed outside the cache, linked relatively."""
    outside = cache.parent / "outside.safetensors"
    shutil.copyfile(snapshot / "model.safetensors", outside)
    return os.path.relpath(outside, snapshot)


def dir_link(snapshot: Path, cache: Path) -> None:
    (snapshot / "extra").symlink_to("/etc")


@dataclass(frozen=True)
class Case:
    name: str
    code: str | None  # the typed error; None: converts (the hostile part is ignored)
    needle: str = ""  # in the error message
    edit: Callable[[Path], None] | None = None
    relink: Callable[[Path, Path], None] | None = None
    tokenizer: bool = False  # only a tokenizer reader sees it (calibration / evaluation), not conversion

    @property
    def repo(self) -> str:
        return f"hostile/{self.name}"


TRILLION = dict(hidden_size=32768, intermediate_size=131072, num_hidden_layers=72, num_attention_heads=256,
                num_key_value_heads=32, vocab_size=262144)  # 1.24e12 parameters

CASES = [
    # (a) pickles
    Case("pickle-only-bin", "unsafe_weights", "pickle", edit=pickle_only),
    Case("pickle-beside-safetensors", None, edit=pickle_beside_safetensors),
    # (b) remote code
    Case("auto-map-llama", None, edit=remote_code(None)),
    Case("auto-map-custom-arch", "unsupported_architecture", "EvilForCausalLM", edit=remote_code("EvilForCausalLM")),
    Case("tokenizer-auto-map", "invalid_tokenizer", "auto_map", edit=tokenizer_remote_code, tokenizer=True),
    # (c) safetensors headers
    Case("st-overlap", "malformed_weights", "overlaps", edit=safetensors_header(_overlap)),
    Case("st-negative-offset", "malformed_weights", "invalid data_offsets", edit=safetensors_header(_negative)),
    Case("st-huge-offset", "malformed_weights", "past the end", edit=safetensors_header(_huge)),
    Case("st-offset-past-file", "malformed_weights", "past the end", edit=safetensors_header(_past_end)),
    Case("st-header-longer-than-file", "malformed_weights", "runs past the end",
         edit=safetensors_header(_header_longer_than_file)),
    Case("st-header-not-json", "malformed_weights", "not valid JSON", edit=safetensors_header(_not_json)),
    Case("st-duplicate-key", "malformed_weights", "twice", edit=safetensors_header(_duplicate_key)),
    Case("st-shape-vs-bytes", "malformed_weights", "needs", edit=safetensors_header(_shape_mismatch)),
    Case("st-dtype-vs-bytes", "malformed_weights", "needs", edit=safetensors_header(_dtype_mismatch)),
    Case("st-huge-shape", "malformed_weights", "needs", edit=safetensors_header(_huge_shape)),
    # (d) symlinks out of the snapshot
    Case("link-config-etc-passwd", "unsafe_weights", "config.json", relink=relink("config.json", lambda s, c: "/etc/passwd")),
    Case("link-config-other-repo", "unsafe_weights", "config.json",
         relink=relink("config.json", other_repo_blob("config.json", absolute=False))),
    Case("link-weights-other-repo-abs", "unsafe_weights", "model.safetensors",
         relink=relink("model.safetensors", other_repo_blob("model.safetensors", absolute=True))),
    Case("link-weights-outside-rel", "unsafe_weights", "model.safetensors",
         relink=relink("model.safetensors", outside_file)),
    Case("link-tokenizer-etc-passwd", "unsafe_weights", "tokenizer.json", edit=tokenizer_entries(64),
         relink=relink("tokenizer.json", lambda s, c: "/etc/passwd")),
    Case("link-dir-to-etc", "unsafe_weights", "extra", relink=lambda s, c: dir_link(s, c)),
    # (e) absurd config.json
    Case("config-1e12-params", "weights_mismatch", "config implies", edit=config_edit(**TRILLION)),
    Case("config-1e12-layers", "invalid_argument", "num_hidden_layers", edit=config_edit(num_hidden_layers=10**12)),
    Case("config-negative", "invalid_argument", "hidden_size", edit=config_edit(hidden_size=-64)),
    Case("config-zero-heads", "invalid_argument", "num_attention_heads", edit=config_edit(num_attention_heads=0)),
    Case("config-float", "invalid_argument", "not an integer", edit=config_edit(intermediate_size=128.5)),
    Case("config-string", "invalid_argument", "not an integer", edit=config_edit(vocab_size="128")),
    Case("config-bool", "invalid_argument", "not an integer", edit=config_edit(num_hidden_layers=True)),
    Case("config-null-required", "invalid_argument", "hidden_size", edit=config_edit(hidden_size=None)),
    Case("config-huge-int", "invalid_argument", "digits",
         edit=config_text(lambda t: t[:-1] + ', "n_ctx": 1' + "0" * 5000 + "}")),
    Case("config-nan", "invalid_argument", "NaN", edit=config_text(lambda t: t[:-1] + ', "rope_theta": NaN}')),
    Case("config-negative-eps", "invalid_argument", "rms_norm_eps", edit=config_edit(rms_norm_eps=-1e-6)),
    Case("config-deep", "invalid_argument", "nests", edit=config_text(lambda t: t[:-1] + ', "x": ' + "[" * 100_000
                                                                       + "]" * 100_000 + "}")),
    Case("config-huge-file", "invalid_argument", "bytes", edit=config_text(lambda t: t[:-1] + ', "pad": "'
                                                                            + "x" * 5_000_000 + '"}')),
    Case("config-duplicate-key", "invalid_argument", "twice",
         edit=config_text(lambda t: t[:-1] + ', "hidden_size": 128}')),
    Case("config-not-object", "invalid_argument", "object", edit=config_text(lambda t: "[1, 2, 3]")),
    # (f) tokenizers
    Case("tokenizer-malformed", "invalid_tokenizer", "cannot be loaded", tokenizer=True,
         edit=tokenizer_text('{"version": "1.0", "model": {"type": "Nope"}}')),
    Case("tokenizer-not-json", "invalid_tokenizer", "cannot be loaded", edit=tokenizer_text("{not json"), tokenizer=True),
    Case("tokenizer-deep", "invalid_tokenizer", "cannot be loaded", edit=tokenizer_text("[" * 100_000), tokenizer=True),
    Case("tokenizer-100k-vs-vocab-128", "invalid_tokenizer", "vocab_size", edit=tokenizer_entries(100_000),
         tokenizer=True),
]


def install_neighbour(base: Path, cache: Path) -> None:
    from service.compiler.sources.smollm2 import install_into_hf_cache

    install_into_hf_cache(base, cache, repo_id="kiln-test/neighbour")


def build_case(case: Case, base: Path, cache: Path, work: Path) -> Path:
    """Lay ``case`` out in the HF cache ``cache`` (from the tiny model folder ``base``); returns the snapshot."""
    from service.compiler.sources.smollm2 import install_into_hf_cache

    staging = work / f"staging-{case.name}"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(base, staging)
    if case.edit:
        case.edit(staging)
    snapshot = Path(install_into_hf_cache(staging, cache, repo_id=case.repo))
    if case.relink:
        case.relink(snapshot, cache)
    return snapshot

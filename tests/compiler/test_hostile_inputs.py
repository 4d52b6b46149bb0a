"""Hostile model repositories through the compiler library: each is laid out in a real huggingface_hub cache
(``tests/hostile.py``), resolved by repo id offline (``resolve_model_dir``, as the service does) and converted;
tokenizer cases go through the calibration reader. Every case ends in its typed error (code, message naming the
culprit, non-empty hint) or, for a hostile part that is only data (``auto_map`` beside a supported architecture,
a pickle beside safetensors), in a normal conversion; no canary file is ever written, nothing is left in the
output's parent, and absurd configs are refused before anything is sized from them."""

from __future__ import annotations

import resource
import shutil
import time
import tracemalloc

import pytest

from service.compiler import convert_checkpoint
from service.compiler.errors import KilnError
from service.compiler.quantization.calibration import CalibrationSettings, calibration_data
from service.compiler.sources.hub import resolve_model_dir
from service.compiler.sources.tokenizer import load_tokenizer
from tests.hostile import (
    CASES,
    Case,
    build_case,
    install_neighbour,
    make_tiny_llama,
    word_level_tokenizer,
)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hostile_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base = make_tiny_llama(root / "base")
    cache = root / "hf-cache"
    install_neighbour(base, cache)
    canaries = root / "canary"
    canaries.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_TEST_CANARY_DIR", str(canaries))
    mp.setenv("HF_HUB_OFFLINE", "1")
    for case in CASES:
        build_case(case, base, cache, root)
    yield root, cache, canaries
    mp.undo()


def _run(case: Case, cache, out):
    """What the service does with the repo: resolve it by id in the cache, then convert (or read its tokenizer)."""
    snapshot = resolve_model_dir(case.repo, cache_dir=cache, allow_download=False, repo_only=True)
    if case.tokenizer:
        return calibration_data(CalibrationSettings(samples=1, seq_len=16), snapshot, vocab_size=128)
    return convert_checkpoint(snapshot, out, dtype="float32")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_repo_is_refused_with_a_typed_error_or_read_as_data(hostile_cache, case, tmp_path):
    root, cache, canaries = hostile_cache
    out = tmp_path / "out"
    start = time.perf_counter()
    if case.code is None:
        _run(case, cache, out)
        assert (out / "rank0.safetensors").exists() and (out / "config.json").exists()
    else:
        with pytest.raises(KilnError) as info:
            _run(case, cache, out)
        err = info.value
        assert err.code == case.code, (err.code, err.message)
        assert case.needle in err.message, err.message
        assert err.hint, f"{case.name}: no hint"
        assert not out.exists() and not list(tmp_path.iterdir()), "something half-written was left"
        assert "root:" not in err.message  # never echoes /etc/passwd
    assert time.perf_counter() - start < 10, "not refused fast"
    assert not list(canaries.iterdir()), "code from the repository ran"


def test_pickle_with_code_is_refused_even_when_allowed(hostile_cache, tmp_path):
    """--allow-pickle reads with torch.load(weights_only=True): the gadget is refused, the canary never written."""
    _, cache, canaries = hostile_cache
    snapshot = resolve_model_dir("hostile/pickle-only-bin", cache_dir=cache, allow_download=False, repo_only=True)
    with pytest.raises(KilnError) as info:
        convert_checkpoint(snapshot, tmp_path / "out", dtype="float32", allow_pickle=True)
    assert info.value.code == "unsafe_weights" and "weights-only" in info.value.message
    assert not list(canaries.iterdir())


def test_trillion_parameter_config_is_refused_before_any_allocation(hostile_cache, tmp_path):
    """1.24e12 parameters (and 10^12 layers): refused from config.json and headers alone, in milliseconds, with
    no allocation to speak of (tracemalloc peak, and the process's peak RSS does not move)."""
    _, cache, _ = hostile_cache
    for repo, code in (("hostile/config-1e12-params", "weights_mismatch"),
                       ("hostile/config-1e12-layers", "invalid_argument")):
        snapshot = resolve_model_dir(repo, cache_dir=cache, allow_download=False, repo_only=True)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        start = time.perf_counter()
        try:
            with pytest.raises(KilnError) as info:
                convert_checkpoint(snapshot, tmp_path / "out", dtype="float32")
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert info.value.code == code, info.value.message
        assert seconds < 2.0, seconds
        assert peak < 16 << 20, f"{repo}: {peak} bytes traced"
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 << 10  # KiB: < 64 MiB


def test_hundred_thousand_entry_tokenizer_loads_in_bounded_time(tmp_path):
    """A 100k-entry tokenizer is a normal tokenizer: it loads and tokenizes the calibration text in bounded
    time (its ids are only refused against a model with a smaller vocabulary: the case above)."""
    word_level_tokenizer(tmp_path, 100_000)
    start = time.perf_counter()
    tok = load_tokenizer(tmp_path)
    data = calibration_data(CalibrationSettings(samples=2, seq_len=16), tmp_path, vocab_size=100_000)
    assert len(tok) == 100_000 and tuple(data.calib.shape) == (2, 16)
    assert time.perf_counter() - start < 10


def test_snapshot_links_inside_the_repo_are_fine(hostile_cache, tmp_path):
    """The ordinary cache layout (every snapshot file a relative link into blobs/) resolves and converts."""
    _, cache, _ = hostile_cache
    snapshot = resolve_model_dir("kiln-test/neighbour", cache_dir=cache, allow_download=False, repo_only=True)
    assert (snapshot / "model.safetensors").is_symlink()
    convert_checkpoint(snapshot, tmp_path / "out", dtype="float32")
    shutil.rmtree(tmp_path / "out")

"""`kiln convert / validate / build / generate` as a newcomer meets them: help on every flag, validate's
errors for what is not a checkpoint, and the progress bar (name tails, ETA, rank label, one clock)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.compiler.cli import ProgressBar

ROOT = Path(__file__).resolve().parents[2]


def kiln(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory) -> Path:
    """A random 2-layer Llama saved by transformers: a real Hugging Face model folder."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


# -- validate ------------------------------------------------------------------------------------

def test_validate_nonexistent_directory_says_so_with_a_validate_hint(tmp_path):
    missing = tmp_path / "nonexistent"
    r = kiln("validate", str(missing))
    assert r.returncode == 2
    assert f"no such directory: {missing}" in r.stderr
    assert "kiln convert SRC OUT" in r.stderr  # where a checkpoint comes from
    assert "Hugging Face folder, or a repo id" not in r.stderr  # not convert's hint
    assert "INVALID" not in r.stdout and "None" not in r.stdout


def test_validate_a_hugging_face_folder_points_to_kiln_convert(hf_tiny):
    r = kiln("validate", str(hf_tiny))
    assert r.returncode == 2
    assert f"{hf_tiny} is a Hugging Face model folder (LlamaForCausalLM), not a TensorRT-LLM checkpoint" in r.stderr
    assert f"hint: convert it first: kiln convert {hf_tiny} CKPT, then kiln validate CKPT" in r.stderr
    assert "lacks required keys" not in r.stderr + r.stdout
    r = kiln("validate", str(hf_tiny), "--json")
    body = json.loads(r.stdout)
    assert body["ok"] is False and body["error"]["code"] == "invalid_checkpoint"
    assert "kiln convert" in body["error"]["hint"]


def test_validate_a_directory_without_config_json(tmp_path):
    r = kiln("validate", str(tmp_path))
    assert r.returncode == 2
    assert f"{tmp_path} has no config.json: not a TensorRT-LLM checkpoint" in r.stderr
    assert "repo id present in the HF cache" not in r.stderr


# -- help ---------------------------------------------------------------------------------------

def _subparsers():
    import argparse

    from service.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_flag_of_every_command_has_help():
    _, commands = _subparsers()
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in commands.items() for a in p._actions
               if not a.help and a.dest != "help"]
    assert not missing, missing
    convert = commands["convert"].format_help()
    for flag, words in (("--dtype", "dtype of the written weights"), ("--tp-size", "tensor-parallel"),
                        ("--pp-size", "pipeline-parallel"), ("--calibration-samples", "calibration sequences"),
                        ("--calibration-seq-len", "tokens per calibration sequence")):
        assert re.search(re.escape(flag) + r"[^\n]*\n?\s+.*" + re.escape(words.split()[0]), convert), flag
        assert words in " ".join(convert.split()), (flag, words)


def test_no_help_page_shows_a_source_path():
    parser, commands = _subparsers()
    pages = {"kiln": parser.format_help(), **{n: p.format_help() for n, p in commands.items()}}
    shown = {n: re.findall(r"service/\w+", page) for n, page in pages.items()}
    assert not any(shown.values()), shown
    assert "calibration (with --quantization or --kv-cache-quantization)" in pages["convert"]


# -- the progress bar ---------------------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


LONG = "transformer.layers.12.attention.qkv.weight"  # 42 characters


def test_bar_shows_the_tail_of_long_names_the_rank_and_an_eta():
    bar = ProgressBar("convert", _Tty(), columns=100)
    line = bar.render(0.25, 10.0, f"rank 1/4 {LONG}")
    assert "rank 1/4" in line and "ETA 30.0s" in line and "10.0s" in line
    assert LONG in line and len(line) <= 100  # wide enough: the whole name
    narrow = ProgressBar("convert", _Tty(), columns=80).render(0.25, 10.0, f"rank 1/4 {LONG}")
    assert len(narrow) <= 80 and "rank 1/4" in narrow
    shown = narrow.split("rank 1/4 ", 1)[1].strip()
    assert shown.startswith("…") and LONG.endswith(shown[1:]) and len(shown) >= 25  # the distinguishing tail
    plain = ProgressBar("convert", io.StringIO())
    assert plain.render(0.5, 4.0, LONG) == f"convert: 50% 4.0s ETA 4.0s {LONG}"  # logs: the whole name


def test_bar_and_summary_share_one_clock():
    out = io.StringIO()
    bar = ProgressBar("convert", out, start=__import__("time").perf_counter() - 3.5)  # the command began 3.5 s ago
    bar(0.5, "x")
    seconds = bar.finish()
    assert seconds >= 3.5
    assert out.getvalue().splitlines()[-1] == f"convert: 100% {seconds:.1f}s done"
    assert bar.finish(99.0) == 99.0 and out.getvalue().count("100%") == 1  # drawn once


def test_convert_prints_rank_labels_and_the_same_seconds_in_bar_and_summary(hf_tiny, tmp_path):
    r = kiln("convert", str(hf_tiny), str(tmp_path / "ckpt"), "--dtype", "float32", "--tp-size", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any("rank 0/2 transformer." in x for x in lines) and any("rank 1/2 transformer." in x for x in lines)
    assert any(" ETA " in x for x in lines)
    final = re.search(r"^convert: 100% ([\d.]+)s done$", r.stderr, re.M)
    summary = re.search(r", ([\d.]+) s \(", r.stdout)
    assert final and summary, (r.stderr, r.stdout)
    assert final.group(1) == summary.group(1)
    r = kiln("convert", str(hf_tiny), str(tmp_path / "ckpt1"), "--dtype", "float32", "--json")
    assert r.returncode == 0 and "rank 0/1" not in r.stderr  # one rank: no label
    seconds = json.loads(r.stdout)["seconds"]
    assert re.search(rf"^convert: 100% {seconds:.1f}s done$", r.stderr, re.M), r.stderr


def test_build_of_a_tp_engine_labels_the_rank_and_advances_once(hf_tiny, tmp_path):
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    assert kiln("convert", str(hf_tiny), str(ckpt), "--dtype", "float32", "--tp-size", "2", "--quiet").returncode == 0
    r = kiln("build", str(ckpt), str(engine), "--keep-tensor-parallel", "--target", "cpu", "--no-measure",
             "--max-batch-size", "1", "--max-input-len", "16", "--max-seq-len", "32")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("build: ")]
    assert any("rank 0/2 " in x for x in lines) and any("rank 1/2 " in x for x in lines), lines
    pcts = [int(re.match(r"build: (\d+)%", x).group(1)) for x in lines]
    assert pcts == sorted(pcts) and pcts[-1] == 100  # one bar over both ranks, not 0..100 twice
    total = re.search(r"^build: 100% ([\d.]+)s done$", r.stderr, re.M).group(1)
    assert f"of weights in {total} s (build " in r.stdout  # the bar's clock is the summary's


def test_a_phase_after_the_measured_work_gets_its_own_line_and_no_eta():
    out = io.StringIO()
    bar = ProgressBar("build", out)
    bar(0.5, "layers.0.qkv")
    bar(1.0, "lm_head")
    bar(1.0, "timing the engine")  # same fraction, new message: a phase the fraction does not measure
    last = out.getvalue().splitlines()[-1]
    assert re.fullmatch(r"build: 99% [\d.]+s ETA -- timing the engine", last), last


def test_build_and_generate_say_what_they_were_given_instead(hf_tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert kiln("convert", str(hf_tiny), str(ckpt), "--dtype", "float32", "--quiet").returncode == 0
    r = kiln("build", str(tmp_path / "nope"), str(tmp_path / "engine"))
    assert r.returncode == 2 and f"no such directory: {tmp_path / 'nope'}" in r.stderr
    assert "kiln convert SRC OUT" in r.stderr and "HF cache" not in r.stderr
    r = kiln("build", str(hf_tiny), str(tmp_path / "engine"))
    assert r.returncode == 2 and "is a Hugging Face model folder (LlamaForCausalLM), not a TensorRT-LLM checkpoint" in r.stderr
    assert f"kiln convert {hf_tiny} CKPT, then kiln build CKPT ENGINE" in r.stderr
    assert "lacks required keys" not in r.stderr
    r = kiln("generate", str(ckpt), "--ids", "1,2")
    assert r.returncode == 2 and f"{ckpt} is a TensorRT-LLM checkpoint, not an engine directory" in r.stderr
    assert f"kiln build {ckpt} ENGINE, then kiln generate ENGINE" in r.stderr
    r = kiln("generate", str(tmp_path / "nope"), "--ids", "1,2")
    assert r.returncode == 2 and "no such directory" in r.stderr and "kiln build CKPT ENGINE" in r.stderr

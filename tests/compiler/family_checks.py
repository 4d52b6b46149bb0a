"""The end-to-end check every new dense family passes (issue 17), against transformers' own model:
a tiny random HF model -> convert (tp 1 and tp 2) -> validate -> reference logits -> torch engine
(CPU: tp 1, a tp 2 checkpoint merged, and a kept tp 2 engine, one process per rank) -> greedy tokens
equal transformers' greedy generation, token for token, in float32. A GPU variant compares a bf16
CUDA engine with the reference runtime."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from service.compiler import Mapping, convert_checkpoint, validate_checkpoint
from service.compiler.build import BuildConfig, build
from service.compiler.engine.engine import Engine
from service.compiler.engine.ranks import run_ranks
from service.compiler.reference import ReferenceModel

# unequal lengths (right padding in one batch), both longer than the tiny models' sliding windows
PROMPTS = [[5, 17, 3, 88, 41, 9, 2, 61, 30, 12, 77], [60, 1, 33, 8, 95, 14, 7]]
NEW_TOKENS = 12

RANK_MAIN = """
import argparse, json
from service.compiler.engine.engine import engine_in_group
from service.compiler.engine.ranks import add_rank_arguments, exit_rank
p = argparse.ArgumentParser()
p.add_argument("engine_dir"); p.add_argument("prompts"); p.add_argument("new", type=int); add_rank_arguments(p)
a = p.parse_args()
with engine_in_group(a.engine_dir, a.rank, a.world_size, a.init_method) as engine:
    out = {"tokens": engine.generate(json.loads(a.prompts), max_new_tokens=a.new).tokens,
           "logits": engine.forward([json.loads(a.prompts)[0]]).tolist()}
print(json.dumps(out))
exit_rank(0)
"""


def perturb_norms(model) -> None:
    """Non-trivial norm weights (Gemma's start at 0, Qwen's at 1), so a wrong (1 + w) or a skipped
    norm shows."""
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "norm" in name:
                t.add_(0.3 * torch.randn_like(t))


def hf_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def convert_both(model, tmp_path: Path) -> tuple[Path, Path]:
    """The HF folder converted at tp 1 and tp 2 (float32), each validated against config.json."""
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    one, two = tmp_path / "ckpt1", tmp_path / "ckpt2"
    convert_checkpoint(tmp_path / "hf", one, dtype="float32")
    convert_checkpoint(tmp_path / "hf", two, dtype="float32", mapping=Mapping(tp_size=2))
    for ckpt in (one, two):
        report = validate_checkpoint(ckpt, strict=True)
        assert report.ok, report.errors
    return one, two


def check_reference(model, ckpts: tuple[Path, ...]) -> None:
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = model(ids).logits.float()
    for ckpt in ckpts:
        ref = ReferenceModel.from_checkpoint(ckpt)
        torch.testing.assert_close(ref.forward(ids), want, rtol=1e-4, atol=1e-4)
        cache = ref.new_cache()  # incremental, past the sliding window
        steps = [ref.forward(ids[:, :3], cache)] + [ref.forward(ids[:, t:t + 1], cache) for t in range(3, ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-4, atol=1e-4)


def run_tp2(engine_dir: Path) -> dict:
    outs = run_ranks(["-c", RANK_MAIN, str(engine_dir), json.dumps(PROMPTS), str(NEW_TOKENS)], 2,
                     what="the tp=2 engine", timeout_s=600)
    r0, r1 = (json.loads(o.strip().splitlines()[-1]) for o in outs)
    assert r0["tokens"] == r1["tokens"]
    return r0


def check_engines(model, one: Path, two: Path, tmp_path: Path) -> None:
    """CPU engines at tp 1, merged from tp 2, and kept at tp 2: transformers' greedy tokens."""
    want = hf_greedy(model, PROMPTS, NEW_TOKENS)
    def bc(keep: bool = False) -> BuildConfig:
        return BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=32, target="cpu", keep_tensor_parallel=keep)

    build(one, bc(), tmp_path / "e1")
    build(two, bc(), tmp_path / "e2merged")
    build(two, bc(True), tmp_path / "e2")
    for d in ("e1", "e2merged"):
        engine = Engine.load(tmp_path / d)
        assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS).tokens == want, d
        single = [engine.generate([p], max_new_tokens=NEW_TOKENS).tokens[0] for p in PROMPTS]  # no padding
        assert single == want, d
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]])).logits.float()
    got = run_tp2(tmp_path / "e2")
    assert got["tokens"] == want
    torch.testing.assert_close(torch.tensor(got["logits"]), logits, rtol=1e-4, atol=1e-4)


def check_gpu(model, tmp_path: Path) -> None:
    """bf16 on CUDA, compiled with CUDA graphs: greedy tokens equal the reference runtime's (bf16).
    Weights are drawn again with 1/sqrt(fan_in) scale (embedding / head std 1) and the soft-caps set
    to Gemma 2's real 50 / 30, so the logits are peaked and greedy choices are not bf16 near-ties."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "embed" in name or "lm_head" in name:
                t.normal_(0.0, 1.0)
            elif t.dim() == 2:
                t.normal_(0.0, t.shape[1] ** -0.5)
    for key, value in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)):
        if getattr(model.config, key, None):
            setattr(model.config, key, value)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16")
    build(tmp_path / "ckpt", BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=64, target="auto"),
          tmp_path / "gpu")
    engine = Engine.load(tmp_path / "gpu")
    assert engine.device.type == "cuda"
    assert engine.use_graphs
    got = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS).tokens
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt", device="cuda")
    want = [ref.generate(p, max_new_tokens=NEW_TOKENS) for p in PROMPTS]
    assert got == want
    x = torch.tensor([PROMPTS[0]])
    torch.testing.assert_close(engine.forward(x), ref.forward(x).cpu(), rtol=2e-2, atol=0.5)

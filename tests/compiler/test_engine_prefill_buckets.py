"""Bucketed prefills (``Engine.set_prefill_graphs``): prompts padded to a fixed (batch, length) bucket so a
CUDA graph per bucket can replay them. On the CPU the same padding runs eagerly; these tests check that
the padding changes no token against transformers (a full-attention Llama, Gemma 2's sliding ring caches
shorter than the padded length, Phi-3's longrope whose short/long choice must follow each row's own
length), and which prefills take a bucket. The GPU test replays the graphs and compares with the eager
prefill of the same engine."""

from __future__ import annotations

import pytest
import torch

from service.compiler import convert_checkpoint
from service.compiler.build import BuildConfig, build
from service.compiler.engine.engine import PREFILL_GRAPH_LENGTHS, Engine
from tests.compiler.family_checks import hf_greedy, perturb_norms

transformers = pytest.importorskip("transformers")

NEW = 6
# one row, rows of different lengths (a batch bucket of 4 for 3 rows), lengths 3 .. 40
PROMPT_SETS = [
    [[5, 17, 3]],
    [[5, 17, 3, 88, 41, 9, 2, 61, 30, 12, 77, 4, 6, 8, 10, 12, 14]],
    [[60, 1, 33, 8, 95], list(range(3, 43)), [7, 7, 7, 9, 11, 13, 15, 17, 19, 21, 23]],
]


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=128))


def _gemma2():  # window 5: the ring of each sliding layer is far shorter than a padded 16/32/64 prefill
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, max_position_embeddings=128))


def _phi3():  # original length 13: some rows start short of it, some past it, in one padded batch
    half = 8
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=128, original_max_position_embeddings=13,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
                      "long_factor": [1.5 + 0.4 * i for i in range(half)]},
        pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=None))


FAMILIES = {"llama": _llama, "gemma2": _gemma2, "phi3": _phi3}


@pytest.fixture(scope="module", params=list(FAMILIES))
def engine_and_model(request, tmp_path_factory):
    torch.manual_seed(0)
    model = FAMILIES[request.param]().eval()
    perturb_norms(model)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "hf", safe_serialization=True)
    convert_checkpoint(root / "hf", root / "ckpt", dtype="float32")
    build(root / "ckpt", BuildConfig(max_batch_size=4, max_input_len=48, max_seq_len=64, target="cpu",
                                     measure_performance=False), root / "engine")
    return Engine.load(root / "engine"), model


def test_bucketed_prefill_gives_transformers_tokens(engine_and_model):
    engine, model = engine_and_model
    assert engine.set_prefill_graphs(True)
    try:
        for prompts in PROMPT_SETS:
            assert engine._prefill_bucket(len(prompts), max(map(len, prompts))) is not None
            assert engine.generate(prompts, max_new_tokens=NEW).tokens == hf_greedy(model, prompts, NEW)
    finally:
        engine.set_prefill_graphs(False)


def test_bucketed_and_plain_prefill_logits_agree(engine_and_model):
    engine, _ = engine_and_model
    prompts = PROMPT_SETS[2]
    with torch.inference_mode():
        plain = engine._prefill_rows(prompts)
        engine.set_prefill_graphs(True)
        try:
            bucketed = engine._prefill_rows(prompts)
        finally:
            engine.set_prefill_graphs(False)
    assert bucketed.shape == plain.shape == (3, engine.model.vocab)
    torch.testing.assert_close(bucketed, plain, rtol=1e-4, atol=1e-4)


def test_which_prefills_take_a_bucket(engine_and_model):
    engine, _ = engine_and_model
    assert engine._prefill_bucket(1, 5) is None  # off by default
    engine.set_prefill_graphs(True, tokens=128)
    try:
        assert engine._prefill_bucket(1, 5) == (1, 16)
        assert engine._prefill_bucket(1, 16) == (1, 16)
        assert engine._prefill_bucket(1, 17) == (1, 32)
        assert engine._prefill_bucket(3, 20) == (4, 32)  # batch bucket 4 x 32 = 128 tokens: within the cap
        assert engine._prefill_bucket(3, 40) is None  # 4 x 64 > 128: the plain prefill
        assert engine._prefill_bucket(1, 48) == (1, 64)  # 64 <= max_seq_len 64
    finally:
        engine.set_prefill_graphs(False)
    assert PREFILL_GRAPH_LENGTHS == tuple(sorted(PREFILL_GRAPH_LENGTHS))


def test_tensor_parallel_and_moe_engines_keep_the_plain_prefill(engine_and_model):
    engine, _ = engine_and_model
    plans = engine.model.plans
    try:
        engine.model.plans = [lp._replace(plan=lp.plan._replace(mlp="moe")) for lp in plans]
        assert engine.set_prefill_graphs(True) is False and engine._prefill_bucket(1, 5) is None
    finally:
        engine.model.plans = plans


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "mixtral"])
def test_compiled_engine_gives_transformers_tokens_on_cpu(family, tmp_path):
    """The torch.compile'd step functions (what a GPU engine always runs; Inductor's C++ backend here)
    trace and give transformers' tokens: GQA in the prefill with symbolic batch and length (Llama, causal
    SDPA; Gemma 2, sliding rings and soft-capped scores; Phi-3, per-row longrope tables; Mixtral, routed
    experts), which the eager CPU tests do not trace. Prefills of new batch sizes and lengths reuse the
    graphs compiled for the first ones (no recompiles)."""
    from torch._dynamo.utils import counters

    from tests.compiler import test_family_moe as moe

    torch.manual_seed(0)
    model = moe.tiny("mixtral") if family == "mixtral" else FAMILIES[family]().eval()
    if family != "mixtral":
        perturb_norms(model)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float32")
    build(tmp_path / "ckpt", BuildConfig(max_batch_size=4, max_input_len=48, max_seq_len=64, target="cpu",
                                         measure_performance=False), tmp_path / "engine")
    engine = Engine.load(tmp_path / "engine", compile=True)
    if family == "mixtral":  # test_family_moe's prompts and greedy (no min_new_tokens: EOS is a likely token)
        assert engine.generate(moe.PROMPTS, max_new_tokens=8).tokens == moe.hf_greedy(model)
    else:
        prompts = PROMPT_SETS[2]
        assert engine.generate(prompts, max_new_tokens=NEW).tokens == hf_greedy(model, prompts, NEW)
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for b, t in ((3, 24), (2, 9), (4, 47)):
            engine.model.prefill(torch.randint(3, 90, (b, t)), torch.full((b,), t))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_prefill_graphs_replay_what_the_eager_prefill_computes(tmp_path):
    """bf16 Llama on the GPU: with prefill graphs on, the same greedy tokens as with them off, and the
    bucket's graph replays give the same last-token logits as the eager prefill of the same padding."""
    torch.manual_seed(0)
    model = _llama().eval()
    with torch.no_grad():  # 1/sqrt(fan_in) weights: peaked logits, so bf16 greedy choices are not near-ties
        for name, w in model.named_parameters():
            if w.dim() == 2:
                w.normal_(0.0, 1.0 if "embed" in name or "lm_head" in name else w.shape[1] ** -0.5)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16")
    build(tmp_path / "ckpt", BuildConfig(max_batch_size=4, max_input_len=48, max_seq_len=64, target="auto"),
          tmp_path / "engine")
    plain = Engine.load(tmp_path / "engine", prefill_graphs=False)
    graphed = Engine.load(tmp_path / "engine", prefill_graphs=True)
    assert plain.use_graphs and graphed.prefill_graph_tokens and not plain.prefill_graph_tokens
    for prompts in PROMPT_SETS:
        want = plain.generate(prompts, max_new_tokens=NEW).tokens
        assert graphed.generate(prompts, max_new_tokens=NEW).tokens == want
        assert graphed.generate(prompts, max_new_tokens=NEW).tokens == want  # a replay of a captured graph
    assert set(graphed._prefill_graphs) == {(1, 16), (1, 32), (4, 64)}
    prompts = PROMPT_SETS[2]
    with torch.inference_mode():
        replayed = graphed._prefill_rows(prompts).clone()
        graphed.use_graphs = False  # the same bucket's padding, run eagerly
        eager = graphed._prefill_rows(prompts)
    torch.testing.assert_close(replayed, eager)  # float32 logits: float32's default tolerance

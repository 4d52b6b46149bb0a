"""The reference runtime against transformers, through the converter, for every TP x PP split.

Tiny random HF models are built here (once per module), converted to TensorRT-LLM checkpoints at
float32 and run by ``ReferenceModel``; logits must match ``model(ids).logits`` to a relative error
of 1e-4. Greedy generation and perplexity are compared with transformers too, and broken
checkpoints must fail with typed errors that name the file and the tensor.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.compiler import Mapping, convert_checkpoint
from service.compiler.errors import InvalidArgument, InvalidCheckpoint
from service.compiler.reference import ReferenceModel, load_checkpoint_weights

transformers = pytest.importorskip("transformers")

V = 101  # odd: lm_head is zero-padded for tp=2 and tp=4
LLAMA_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=V, max_position_embeddings=128, initializer_range=0.2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
GPT_KW = dict(vocab_size=V, n_positions=64, n_embd=64, n_layer=4, n_head=4, initializer_range=0.2,
              bos_token_id=0, eos_token_id=0)
OPT_KW = dict(vocab_size=V, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=4,
              num_attention_heads=4, max_position_embeddings=64, init_std=0.2)


def _build(kind: str):
    T = transformers
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**LLAMA_KW, rope_scaling=LLAMA3))
    if kind == "llama_tied":
        return T.LlamaForCausalLM(T.LlamaConfig(**LLAMA_KW, tie_word_embeddings=True))
    if kind == "llama_bias_linear_rope":  # attention_bias also gives o_proj a bias; mlp_bias all three
        return T.LlamaForCausalLM(T.LlamaConfig(**{**LLAMA_KW, "intermediate_size": 160}, attention_bias=True,
                                                mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    if kind == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**LLAMA_KW, sliding_window=None))
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**LLAMA_KW, tie_word_embeddings=False))
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(**GPT_KW))  # gelu_new
    if kind == "opt":
        return T.OPTForCausalLM(T.OPTConfig(**OPT_KW, do_layer_norm_before=True))  # relu
    if kind == "opt_post_ln":
        return T.OPTForCausalLM(T.OPTConfig(**OPT_KW, do_layer_norm_before=False, activation_function="gelu"))
    raise AssertionError(kind)


KINDS = ("llama", "llama_tied", "llama_bias_linear_rope", "mistral", "qwen2", "gpt2", "opt", "opt_post_ln")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """kind -> (HF folder, eval-mode model), built lazily and once per module."""
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            torch.manual_seed(sum(map(ord, kind)))
            model = _build(kind).eval()
            with torch.no_grad():  # HF starts biases at 0 and norms at 1: perturb them so they count
                for p in model.parameters():
                    if p.dim() == 1:
                        p.add_(0.1 * torch.randn_like(p))
            d = tmp_path_factory.mktemp(kind)
            model.save_pretrained(d, safe_serialization=True)
            cache[kind] = (d, model)
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def ckpts(hf_models, tmp_path_factory):
    """(kind, tp, pp[, layers_per_stage]) -> converted checkpoint directory, converted once."""
    cache: dict = {}

    def get(kind: str, tp: int, pp: int, layers_per_stage=None):
        key = (kind, tp, pp, layers_per_stage)
        if key not in cache:
            src, _ = hf_models(kind)
            out = tmp_path_factory.mktemp(f"{kind}-tp{tp}-pp{pp}") / "ckpt"
            convert_checkpoint(src, out, dtype="float32",
                               mapping=Mapping(tp_size=tp, pp_size=pp, layers_per_stage=layers_per_stage))
            cache[key] = out
        return cache[key]

    return get


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def ids_for(seed: int, batch: int = 2, tokens: int = 37) -> torch.Tensor:
    return torch.randint(0, V, (batch, tokens), generator=torch.Generator().manual_seed(seed))


CASES = [
    ("llama", 1, 1), ("llama", 2, 1), ("llama", 1, 2), ("llama", 2, 2), ("llama", 4, 1),
    ("llama_tied", 2, 2), ("llama_bias_linear_rope", 2, 1),
    ("mistral", 1, 2), ("qwen2", 2, 2), ("qwen2", 4, 1),
    ("gpt2", 1, 1), ("gpt2", 2, 2), ("opt", 2, 1), ("opt", 1, 2), ("opt_post_ln", 2, 2),
]


@pytest.mark.parametrize("kind,tp,pp", CASES, ids=[f"{k}-tp{t}-pp{p}" for k, t, p in CASES])
def test_logits_match_transformers(hf_models, ckpts, kind, tp, pp):
    _, model = hf_models(kind)
    ids = ids_for(tp * 10 + pp)
    with torch.no_grad():
        want = model(ids).logits.float()
    ref = ReferenceModel.from_checkpoint(ckpts(kind, tp, pp))
    got = ref.forward(ids)
    assert got.dtype == torch.float32 and got.shape == (2, ids.shape[1], V)
    assert ref.config["mapping"]["tp_size"] == tp and ref.config["mapping"]["pp_size"] == pp
    assert rel_err(got, want) <= 1e-4


def test_uneven_layers_per_stage(hf_models, ckpts):
    _, model = hf_models("llama")
    out = ckpts("llama", 2, 2, (1, 3))
    assert json.loads((out / "config.json").read_text())["mapping"]["layers_per_stage"] == [1, 3]
    ids = ids_for(5)
    with torch.no_grad():
        want = model(ids).logits
    assert rel_err(ReferenceModel.from_checkpoint(out).forward(ids), want) <= 1e-4


def test_merged_weights_are_the_tp1_weights(hf_models, ckpts):
    """tp=4 with 2 KV heads (each duplicated on two ranks) merges back to the HF tensors exactly."""
    _, model = hf_models("llama")
    sd = model.state_dict()
    cfg, w = load_checkpoint_weights(ckpts("llama", 4, 1))
    _, w1 = load_checkpoint_weights(ckpts("llama", 1, 2))
    assert cfg["num_key_value_heads"] == 2 and set(w) == set(w1)
    for name in w:
        assert torch.equal(w[name], w1[name]), name
    a = "model.layers.3.self_attn."
    qkv = torch.cat([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
    assert torch.equal(w["transformer.layers.3.attention.qkv.weight"], qkv)
    assert torch.equal(w["transformer.layers.3.attention.dense.weight"], sd[a + "o_proj.weight"])
    assert torch.equal(w["transformer.layers.3.mlp.fc.weight"], sd["model.layers.3.mlp.gate_proj.weight"])
    assert torch.equal(w["lm_head.weight"], sd["lm_head.weight"])  # padding rows cut: [101, 64]


@pytest.mark.parametrize("kind,tp,pp", [("llama", 2, 2), ("gpt2", 2, 1), ("opt_post_ln", 1, 2)])
def test_greedy_generate_matches_transformers(hf_models, ckpts, kind, tp, pp):
    _, model = hf_models(kind)
    model.generation_config.eos_token_id = None
    prompt = ids_for(7, batch=1, tokens=9)
    n = 20
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, 9:].tolist()
    ref = ReferenceModel.from_checkpoint(ckpts(kind, tp, pp))
    got = ref.generate(prompt.tolist()[0], max_new_tokens=n)
    assert got == want and len(got) == n
    assert len(set(got)) >= 2  # not a constant stream: the comparison means something
    # The KV-cached tokens equal the argmax of a full, uncached forward.
    full = ref.forward(torch.tensor([prompt[0].tolist() + got[:-1]]))
    assert full[0, 8:].argmax(-1).tolist() == got
    # Chunked prefill through a public cache (several new tokens after a cached prefix) = one pass.
    seq = torch.tensor([prompt[0].tolist() + got])
    cache = ref.new_cache()
    chunks = [ref.forward(seq[:, a:b], cache) for a, b in ((0, 5), (5, 12), (12, 13), (13, seq.shape[1]))]
    assert rel_err(torch.cat(chunks, 1), ref.forward(seq)) <= 1e-5
    # EOS stops generation and is returned; the prompt may be a [1, T] tensor.
    eos = got[4]
    first = got.index(eos)
    assert ref.generate(prompt, max_new_tokens=n, eos_token_id=eos) == got[:first + 1]
    assert ref.generate(prompt, max_new_tokens=0) == []


def test_perplexity_matches_transformers_loss(hf_models, ckpts):
    _, model = hf_models("qwen2")
    ref = ReferenceModel.from_checkpoint(ckpts("qwen2", 2, 1))
    ids = ids_for(11, batch=1, tokens=100)[0]
    with torch.no_grad():
        loss = model(ids[None, :48], labels=ids[None, :48]).loss
    assert ref.perplexity(ids[:48], window=48) == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert ref.perplexity(ids[:48].tolist(), window=512) == pytest.approx(math.exp(float(loss)), rel=1e-4)

    # 100 tokens, window 32: windows of 32, 32, 32 and 4 tokens, each scored on its own, NLL
    # averaged over the 31 + 31 + 31 + 3 scored tokens; with 97 tokens the 1-token tail is dropped.
    def manual(seq, window):
        nll, n = 0.0, 0
        for s in range(0, len(seq), window):
            w = seq[s:s + window]
            if len(w) < 2:
                continue
            with torch.no_grad():
                out = model(w[None], labels=w[None])
            nll += float(out.loss) * (len(w) - 1)
            n += len(w) - 1
        return math.exp(nll / n)

    assert ref.perplexity(ids, window=32) == pytest.approx(manual(ids, 32), rel=1e-4)
    assert ref.perplexity(ids[:97], window=32) == pytest.approx(manual(ids[:96], 32), rel=1e-4)
    assert ref.perplexity(ids, window=32) != pytest.approx(ref.perplexity(ids, window=48), rel=1e-4)
    with pytest.raises(InvalidArgument):
        ref.perplexity(ids, window=1)
    with pytest.raises(InvalidArgument):
        ref.perplexity(ids[:1])


def test_float32_upcast_of_a_bfloat16_checkpoint(hf_models, tmp_path):
    src, model = hf_models("llama")
    out = tmp_path / "bf16"
    convert_checkpoint(src, out, dtype="bfloat16", mapping=Mapping(tp_size=2))
    ids = ids_for(3)
    with torch.no_grad():
        want = model(ids).logits
    up = ReferenceModel.from_checkpoint(out, compute_dtype=torch.float32)
    native = ReferenceModel.from_checkpoint(out)
    assert up.dtype == torch.float32 and native.dtype == torch.bfloat16
    assert up.w["lm_head.weight"].dtype == torch.float32
    assert native.forward(ids).dtype == torch.float32
    assert rel_err(up.forward(ids), want) < 0.05  # bf16 weights, float32 math
    assert rel_err(native.forward(ids), want) < 0.1


def _rewrite_rank(ckpt, rank, edit):
    path = ckpt / f"rank{rank}.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_broken_checkpoints_raise_typed_errors_naming_file_and_tensor(ckpts, tmp_path):
    good = ckpts("llama", 2, 2)
    name = "transformer.layers.1.attention.qkv.weight"

    bad = _copy(good, tmp_path / "shape")
    _rewrite_rank(bad, 3, lambda t: t.__setitem__(name, t[name][:-16].contiguous()))
    with pytest.raises(InvalidCheckpoint, match=r"rank3\.safetensors.*layers\.1\.attention\.qkv\.weight.*\[48, 64\].*\[64, 64\]"):
        ReferenceModel.from_checkpoint(bad)

    bad = _copy(good, tmp_path / "missing")
    _rewrite_rank(bad, 2, lambda t: t.pop("transformer.ln_f.weight"))
    with pytest.raises(InvalidCheckpoint, match=r"rank3\.safetensors.*rank2\.safetensors|ln_f"):
        load_checkpoint_weights(bad)

    bad = _copy(good, tmp_path / "unknown")
    for r in (0, 1):
        _rewrite_rank(bad, r, lambda t: t.__setitem__("transformer.layers.0.attention.q_norm.weight", torch.ones(16)))
    with pytest.raises(InvalidCheckpoint, match=r"rank0\.safetensors.*q_norm"):
        load_checkpoint_weights(bad)

    bad = _copy(good, tmp_path / "extra_layer")  # stage 1 owns 2 layers; a local layer 2 is out of range
    for r in (2, 3):
        _rewrite_rank(bad, r, lambda t: t.__setitem__("transformer.layers.2.mlp.fc.weight",
                                                      t["transformer.layers.1.mlp.fc.weight"].clone()))
    with pytest.raises(InvalidCheckpoint, match=r"layers\.2\.mlp\.fc\.weight.*beyond"):
        load_checkpoint_weights(bad)

    bad = _copy(good, tmp_path / "nofile")
    (bad / "rank1.safetensors").unlink()
    with pytest.raises(InvalidCheckpoint, match=r"rank1\.safetensors"):
        load_checkpoint_weights(bad)

    bad = _copy(good, tmp_path / "dtype")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["dtype"] = "float16"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidCheckpoint, match=r"rank0\.safetensors.*F32.*float16"):
        load_checkpoint_weights(bad)


def test_tied_checkpoint_without_lm_head_uses_the_embedding(hf_models, ckpts, tmp_path):
    """TensorRT-LLM shares the embedding table when lm_head.weight is absent and embeddings are tied."""
    _, model = hf_models("llama_tied")
    out = _copy(ckpts("llama_tied", 2, 2), tmp_path / "tied")
    for r in (2, 3):
        _rewrite_rank(out, r, lambda t: t.pop("lm_head.weight"))
    ids = ids_for(2)
    with torch.no_grad():
        want = model(ids).logits
    assert rel_err(ReferenceModel.from_checkpoint(out).forward(ids), want) <= 1e-4
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidCheckpoint, match="lm_head.weight"):
        load_checkpoint_weights(out)


def test_bad_inputs_raise_invalid_argument(ckpts):
    gpt = ReferenceModel.from_checkpoint(ckpts("gpt2", 1, 1))
    with pytest.raises(InvalidArgument, match="vocabulary"):
        gpt.forward(torch.tensor([[1, V]]))
    with pytest.raises(InvalidArgument, match="max_position_embeddings=64"):
        gpt.forward(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(InvalidArgument, match="max_position_embeddings"):
        gpt.generate([1, 2, 3], max_new_tokens=70)
    with pytest.raises(InvalidArgument):
        gpt.forward(torch.zeros(1, 3))
    with pytest.raises(InvalidArgument):
        gpt.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=2)


def test_decilm_checkpoints_run_through_the_one_reference_model(tmp_path):
    """A DeciLM checkpoint (one attention layer with its own KV heads, one no-op attention) split
    tp=2 runs through the same ReferenceModel as every family and equals its tp=1 conversion (the
    block semantics against transformers-free code: tests/compiler/test_nemotron_nas.py)."""
    H, NH = 64, 4
    blocks = [
        {"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False},
         "ffn": {"ffn_mult": 2.0, "no_op": False, "replace_with_linear": False}},
        {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
         "ffn": {"ffn_mult": 2.0, "no_op": False, "replace_with_linear": False}},
    ]
    hf = {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_size": H,
          "num_attention_heads": NH, "num_hidden_layers": 2, "vocab_size": V, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
          "torch_dtype": "float32", "block_configs": blocks}
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf))
    from service.compiler.models.nemotron_nas import ffn_mult_to_intermediate_size

    inter = ffn_mult_to_intermediate_size(2.0, H)
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(V, H, generator=g), "model.norm.weight": torch.ones(H),
          "lm_head.weight": torch.randn(V, H, generator=g) / 8}
    for i in range(2):
        p = f"model.layers.{i}."
        if i == 0:
            sd[p + "input_layernorm.weight"] = torch.ones(H)
            for n, rows in (("q", H), ("k", H // 2), ("v", H // 2), ("o", H)):
                sd[p + f"self_attn.{n}_proj.weight"] = torch.randn(rows, H, generator=g) / 8
        sd[p + "post_attention_layernorm.weight"] = torch.ones(H)
        sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, H, generator=g) / 8
        sd[p + "mlp.up_proj.weight"] = torch.randn(inter, H, generator=g) / 8
        sd[p + "mlp.down_proj.weight"] = torch.randn(H, inter, generator=g) / 8
    save_file(sd, str(src / "model.safetensors"))
    out = tmp_path / "ckpt"
    convert_checkpoint(src, out, dtype="float32", mapping=Mapping(tp_size=2))
    ids = ids_for(1, batch=1, tokens=10)
    convert_checkpoint(src, tmp_path / "ckpt1", dtype="float32")
    ref = ReferenceModel.from_checkpoint(out)
    assert [b.attention.kind for b in ref.spec.blocks] == ["full", "none"]
    assert ref.spec.blocks[0].attention.num_kv_heads == NH // 2
    want = ReferenceModel.from_checkpoint(tmp_path / "ckpt1").forward(ids)
    assert rel_err(ref.forward(ids), want) <= 1e-6
    got = ref.generate(ids, max_new_tokens=5)
    full = ref.forward(torch.tensor([ids[0].tolist() + got[:-1]]))
    assert full[0, 9:].argmax(-1).tolist() == got

"""The ``onnx`` backend: prefill and decode graphs with explicit KV-cache inputs/outputs.

    engine/config.json     {version, backend: "onnx", pretrained_config, build_config, engine{...}}
    engine/prefill.onnx    input_ids [B, T] -> logits [B, T, V], present_keys/values [L, B, nkv, T, d]
    engine/decode.onnx     input_ids [B, 1], past_keys/values [L, B, nkv, P, d]
                           -> logits [B, 1, V], present_keys/values [L, B, nkv, P + 1, d]
    engine/*.onnx.data     the weights, as ONNX external data (one file per graph)
    engine/performance.json  load time, time to first token, decode tokens/s (batch 1, max_batch_size),
                           timed with onnxruntime on the CPU after verification

Rows of a batch have equal lengths (no padding in the graphs). The Llama family and GPT-2 / OPT
(learned positions, LayerNorm, OPT post-LN) are exported; a tp checkpoint is merged into one graph. After export the build runs both
graphs with onnxruntime on the CPU and checks them against the reference runtime (logits and greedy
tokens); the result is stored in config.json. These graphs are also what the TensorRT backend parses.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

from ...checkpoint.validate import load_config
from ...engine.model import activation, apply_rope, layer_norm, rms_norm, rope_inv_freq
from ...engine.performance import PERFORMANCE_FILE, not_measured
from ...errors import InvalidCheckpoint, KilnError
from ...models.gpt import GPT_ARCHS, activation_name, is_post_ln
from ...models.gpt import LAYER_FIELDS as GPT_FIELDS
from ..config import ResolvedBuild
from .torch_backend import ENGINE_VERSION, write_engine_weights

OPSET = 17
# the float Llama engine tensors of one layer, in the order the graph unpacks them: the weights, then
# the optional biases (quantized checkpoints, whose engines carry more, are refused for this backend
# by validate_build)
LLAMA_WEIGHTS = ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down")
LLAMA_BIASES = ("qkv_bias", "o_bias", "gate_up_bias", "down_bias")


class OnnxVerificationFailed(KilnError):
    code = "onnx_verification_failed"


class _OnnxLlama(torch.nn.Module):
    """The engine model as one traceable module (plain attention ops; KV cache in and out)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, cfg: dict, w: dict[str, torch.Tensor], max_seq: int):
        super().__init__()
        self.nh, self.d = int(cfg["num_attention_heads"]), int(cfg["head_size"])
        self.nkv = int(cfg.get("num_key_value_heads") or self.nh)
        self.eps = float(cfg["norm_epsilon"])
        self.L = int(cfg["num_hidden_layers"])
        self.params = torch.nn.ParameterDict()
        for name, t in w.items():
            self.params[name.replace(".", "_")] = torch.nn.Parameter(t, requires_grad=False)
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), rope_inv_freq(cfg))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def _p(self, name: str) -> torch.Tensor | None:
        """An optional tensor (a bias)."""
        key = name.replace(".", "_")
        return self.params[key] if key in self.params else None

    def _w(self, name: str) -> torch.Tensor:
        """A tensor the graph cannot do without."""
        w = self._p(name)
        if w is None:
            raise InvalidCheckpoint(f"the engine weights have no {name!r}")
        return w

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor | None = None,
                past_values: torch.Tensor | None = None):
        B, T = input_ids.shape
        P = 0 if past_keys is None else past_keys.shape[3]
        h = F.embedding(input_ids, self._w("embed"))
        cos, sin = self.cos[P:P + T][None, :, None], self.sin[P:P + T][None, :, None]
        causal = torch.ones(T, P + T, dtype=torch.bool).tril(P)
        keys, values = [], []
        for i in range(self.L):
            ln1, wqkv, wo, ln2, w13, w2 = (self._w(f"layers.{i}.{f}") for f in LLAMA_WEIGHTS)
            bqkv, bo, b13, b2 = (self._p(f"layers.{i}.{f}") for f in LLAMA_BIASES)
            qkv = F.linear(rms_norm(h, ln1, self.eps), wqkv, bqkv)
            q, k, v = qkv.split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], -1)
            q = apply_rope(q.view(B, T, self.nh, self.d), cos, sin).transpose(1, 2)
            k = apply_rope(k.view(B, T, self.nkv, self.d), cos, sin).transpose(1, 2)
            v = v.view(B, T, self.nkv, self.d).transpose(1, 2)
            if past_keys is not None and past_values is not None:
                k = torch.cat([past_keys[i], k], 2)
                v = torch.cat([past_values[i], v], 2)
            keys.append(k)
            values.append(v)
            g = self.nh // self.nkv
            kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            scores = (q @ kk.transpose(-1, -2)).float() * self.d ** -0.5
            scores = scores.masked_fill(~causal, float("-inf"))
            attn = (torch.softmax(scores, -1).to(q.dtype) @ vv).transpose(1, 2).reshape(B, T, self.nh * self.d)
            h = h + F.linear(attn, wo, bo)
            a, u = F.linear(rms_norm(h, ln2, self.eps), w13, b13).chunk(2, -1)
            h = h + F.linear(F.silu(a) * u, w2, b2)
        logits = F.linear(rms_norm(h, self._w("final_norm"), self.eps), self._w("lm_head")).float()
        return logits, torch.stack(keys), torch.stack(values)


class _OnnxGPT(_OnnxLlama):
    """GPT-2 / OPT (the ``kiln-gpt-fused/1`` weights): learned positions, LayerNorm with bias, an
    ungated MLP, OPT's post-LN variant; same inputs and outputs as the Llama graphs."""

    def __init__(self, cfg: dict, w: dict[str, torch.Tensor], max_seq: int):
        torch.nn.Module.__init__(self)
        self.nh, self.d = int(cfg["num_attention_heads"]), int(cfg["head_size"])
        self.nkv = int(cfg.get("num_key_value_heads") or self.nh)
        self.eps = float(cfg.get("norm_epsilon") or 1e-5)
        self.L = int(cfg["num_hidden_layers"])
        self.act, self.post_ln = activation_name(cfg), is_post_ln(cfg)
        if max_seq > w["pos_embed"].shape[0]:
            raise InvalidCheckpoint(f"max_seq_len={max_seq} exceeds the {w['pos_embed'].shape[0]} learned positions")
        self.params = torch.nn.ParameterDict()
        for name, t in w.items():
            self.params[name.replace(".", "_")] = torch.nn.Parameter(t, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor | None = None,
                past_values: torch.Tensor | None = None):
        B, T = input_ids.shape
        P = 0 if past_keys is None else past_keys.shape[3]
        nh, nkv, d, eps = self.nh, self.nkv, self.d, self.eps
        h = F.embedding(input_ids, self._w("embed")) + self._w("pos_embed")[P:P + T][None]
        causal = torch.ones(T, P + T, dtype=torch.bool).tril(P)
        keys, values = [], []
        for i in range(self.L):
            ln1, ln1_b, wqkv, bqkv, wo, bo, ln2, ln2_b, wfc, bfc, wproj, bproj = (
                self._w(f"layers.{i}.{f}") for f in GPT_FIELDS)
            x = h if self.post_ln else layer_norm(h, ln1, ln1_b, eps)
            q, k, v = F.linear(x, wqkv, bqkv).split([nh * d, nkv * d, nkv * d], -1)
            q = q.view(B, T, nh, d).transpose(1, 2)
            k = k.view(B, T, nkv, d).transpose(1, 2)
            v = v.view(B, T, nkv, d).transpose(1, 2)
            if past_keys is not None and past_values is not None:
                k = torch.cat([past_keys[i], k], 2)
                v = torch.cat([past_values[i], v], 2)
            keys.append(k)
            values.append(v)
            kk, vv = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            scores = (q @ kk.transpose(-1, -2)).float() * d ** -0.5
            scores = scores.masked_fill(~causal, float("-inf"))
            attn = (torch.softmax(scores, -1).to(q.dtype) @ vv).transpose(1, 2).reshape(B, T, nh * d)
            h = h + F.linear(attn, wo, bo)
            if self.post_ln:
                h = layer_norm(h, ln1, ln1_b, eps)
                h = layer_norm(h + F.linear(activation(F.linear(h, wfc, bfc), self.act), wproj, bproj), ln2, ln2_b,
                               eps)
            else:
                h = h + F.linear(activation(F.linear(layer_norm(h, ln2, ln2_b, eps), wfc, bfc), self.act), wproj,
                                 bproj)
        if not self.post_ln:
            h = layer_norm(h, self._w("final_norm"), self._w("final_norm_bias"), eps)
        logits = F.linear(h, self._w("lm_head")).float()
        return logits, torch.stack(keys), torch.stack(values)


def onnx_module(cfg: dict, w: dict[str, torch.Tensor], max_seq: int) -> _OnnxLlama:
    """The traceable module for a checkpoint's engine-layout weights (Llama family or GPT-2 / OPT)."""
    if cfg.get("architecture") in GPT_ARCHS:
        return _OnnxGPT(cfg, w, max_seq)
    return _OnnxLlama(cfg, w, max_seq)


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], dynamic: dict) -> None:
    import onnx

    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(module, args, str(tmp), input_names=inputs,
                      output_names=["logits", "present_keys", "present_values"],
                      dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    model = onnx.load(str(tmp))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    for leftover in path.parent.glob(tmp.name + "*"):
        leftover.unlink()
    for leftover in path.parent.iterdir():  # the TorchScript exporter's per-tensor side files
        if leftover.is_file() and leftover.suffix == "" and leftover.name not in ("config.json",):
            leftover.unlink()


def verify_onnx(engine_dir: Path, ckpt_dir: Path, prompt: list[int], new_tokens: int = 8) -> dict:
    """Prefill + greedy decode with onnxruntime (CPU) against the reference runtime."""
    import numpy as np
    import onnxruntime as ort

    from ...reference import ReferenceModel

    ref = ReferenceModel.from_checkpoint(ckpt_dir)
    opts = ort.SessionOptions()
    prefill = ort.InferenceSession(str(engine_dir / "prefill.onnx"), opts, providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(engine_dir / "decode.onnx"), opts, providers=["CPUExecutionProvider"])
    ids = np.array([prompt], dtype=np.int64)
    logits, keys, values = prefill.run(None, {"input_ids": ids})
    ref_logits = ref.forward(prompt).numpy()  # a list is a batch of one: [1, T, vocab]
    max_err = float(np.abs(logits - ref_logits).max())
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(new_tokens - 1):
        step = np.array([[tokens[-1]]], dtype=np.int64)
        logits, keys, values = decode.run(None, {"input_ids": step, "past_keys": keys, "past_values": values})
        tokens.append(int(logits[0, -1].argmax()))
    expect = ref.generate(prompt, max_new_tokens=new_tokens)
    return {"prompt_tokens": len(prompt), "max_abs_logit_error": max_err, "onnx_tokens": tokens,
            "reference_tokens": expect, "greedy_identical": tokens == expect}


def measure_onnx(engine_dir: Path, vocab: int, max_batch: int, max_input: int, max_seq: int,
                 repeats: int = 2) -> dict:
    """performance.json of an onnx engine, timed with onnxruntime on the CPU (see runtime/performance.py)."""
    import statistics

    import numpy as np
    import onnxruntime as ort

    from ...engine.performance import NEW_TOKENS, PERFORMANCE_VERSION, PROMPT_TOKENS

    t0 = time.perf_counter()
    prefill = ort.InferenceSession(str(engine_dir / "prefill.onnx"), providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(engine_dir / "decode.onnx"), providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    n = max(1, min(PROMPT_TOKENS, max_input, max_seq - 2))
    new = max(2, min(NEW_TOKENS, max_seq - n))
    prompt = [(7 * i + 3) % vocab for i in range(n)]

    def run(batch: int, steps: int) -> tuple[float, float]:
        """(seconds to the first token, decode tokens/s over the batch)."""
        t = time.perf_counter()
        logits, keys, values = prefill.run(None, {"input_ids": np.array([prompt] * batch, dtype=np.int64)})
        tok = logits[:, -1].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(steps - 1):
            logits, keys, values = decode.run(None, {"input_ids": tok[:, None].astype(np.int64), "past_keys": keys,
                                                     "past_values": values})
            tok = logits[:, -1].argmax(-1)
        return t1 - t, batch * (steps - 1) / max(time.perf_counter() - t1, 1e-9)

    run(1, new)  # untimed
    ttft = statistics.median(run(1, 1)[0] for _ in range(repeats))
    rate_1 = statistics.median(run(1, new)[1] for _ in range(repeats))
    rate_b = statistics.median(run(max_batch, new)[1] for _ in range(repeats))
    return {"version": PERFORMANCE_VERSION, "backend": "onnx", "device": "cpu (onnxruntime CPUExecutionProvider)",
            "build_seconds": None, "load_seconds": round(load_s, 4), "ttft_seconds": round(ttft, 6),
            "decode_tokens_per_second_batch_1": round(rate_1, 2), "decode_tokens_per_second_max_batch": round(rate_b, 2),
            "max_batch_size": max_batch, "prompt_tokens": n, "new_tokens": {"batch_1": new, "max_batch": new},
            "repeats": repeats, "peak_gpu_memory_bytes": None,
            "peak_gpu_memory_reason": "timed with onnxruntime on the CPU: no GPU memory is used"}


def build_onnx_engine(ckpt_dir: Path, resolved: ResolvedBuild, out_dir: Path, *, progress=None,
                      verify: bool = True) -> dict:
    start = time.perf_counter()
    cfg = load_config(ckpt_dir)
    bc = resolved.config
    assert bc.max_seq_len is not None  # resolved by validate_build
    max_seq = int(bc.max_seq_len)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[bc.dtype]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        from safetensors.torch import load_file

        scratch = tmp / "weights.scratch.safetensors"
        write_engine_weights(ckpt_dir, cfg, dtype, scratch)
        module = onnx_module(cfg, load_file(str(scratch)), max_seq).eval()
        scratch.unlink()
        L, nkv, d = module.L, module.nkv, module.d
        ids = torch.zeros(1, 4, dtype=torch.long)
        kv_axes = {1: "batch", 3: "past"}
        with torch.no_grad():
            _export(module, (ids,), tmp / "prefill.onnx", ["input_ids"],
                    {"input_ids": {0: "batch", 1: "tokens"}, "logits": {0: "batch", 1: "tokens"},
                     "present_keys": {1: "batch", 3: "tokens"}, "present_values": {1: "batch", 3: "tokens"}})
            past = torch.zeros(L, 1, nkv, 4, d, dtype=dtype)
            _export(module, (ids[:, :1], past, past.clone()), tmp / "decode.onnx",
                    ["input_ids", "past_keys", "past_values"],
                    {"input_ids": {0: "batch"}, "past_keys": kv_axes, "past_values": kv_axes,
                     "logits": {0: "batch"}, "present_keys": {1: "batch", 3: "total"},
                     "present_values": {1: "batch", 3: "total"}})
        engine_cfg = {
            "version": ENGINE_VERSION, "backend": "onnx",
            "pretrained_config": {**cfg, "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}},
            "build_config": bc.to_dict(),
            "engine": {"files": sorted(p.name for p in tmp.iterdir()), "opset": OPSET,
                       "inputs": {"prefill": ["input_ids"], "decode": ["input_ids", "past_keys", "past_values"]},
                       "kv_layout": "[layers, batch, kv_heads, tokens, head_size]"},
        }
        if verify:
            prompt = [(7 * i + 3) % int(cfg["vocab_size"]) for i in range(min(12, int(bc.max_input_len)))]
            report = verify_onnx(tmp, ckpt_dir, prompt)
            engine_cfg["verification"] = report
            if not report["greedy_identical"]:
                raise OnnxVerificationFailed(
                    f"onnxruntime generations differ from the reference runtime: {report['onnx_tokens']} vs "
                    f"{report['reference_tokens']} (max logit error {report['max_abs_logit_error']:.3g})"
                )
        stats = {"build_seconds": round(time.perf_counter() - start, 3)}
        engine_cfg["build_stats"] = stats
        (tmp / "config.json").write_text(json.dumps(engine_cfg, indent=2) + "\n")
        perf = (measure_onnx(tmp, int(cfg["vocab_size"]), int(bc.max_batch_size), int(bc.max_input_len),
                             max_seq) if bc.measure_performance
                else not_measured("build_config.measure_performance is false"))
        (tmp / PERFORMANCE_FILE).write_text(json.dumps({**perf, "build_seconds": stats["build_seconds"]}, indent=2)
                                            + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
        return stats
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

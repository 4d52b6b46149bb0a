"""llama.cpp GGUF files as a weight source: validated header, HF config, dequantized HF-named tensors.

``kiln convert model.gguf OUT`` reads one ``.gguf`` file (Llama, Qwen2, Qwen3, Gemma 2/3, Phi-3
architectures) and feeds the ordinary converter of the matching HF family:

- the header (GGUF v2/v3, little-endian) is parsed here with explicit bounds: counts, string and
  array lengths, dimensions, tensor types, alignment, and every tensor's byte range inside the file
  (no overlaps) are checked before anything else happens; a bad file is ``MalformedWeights``;
- metadata maps to an HF ``config.json`` dict, key for key as transformers' GGUF loader
  (``integrations/ggml.py`` ``GGUF_CONFIG_MAPPING``) maps it; tensor names map to HF names as
  ``gguf``'s ``tensor_mapping`` pairs them;
- tensors are dequantized with ``gguf.quants.dequantize`` (F32/F16/BF16 are passed through;
  Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 and the K-quants Q2_K..Q6_K become float32), then cast to the
  requested dtype by the converter. Quirks of llama.cpp's converter are undone where they are
  handled: Llama's q/k rows are permuted back to HF's rotary layout, Gemma's norm weights had 1
  added;
- the tokenizer (when the file has one) is rebuilt as an HF tokenizer by transformers' GGUF
  tokenizer converter and written next to the checkpoint's config.json (``kiln build`` copies it
  into the engine).

``gguf`` (numpy only) is imported lazily, for dequantization; parsing needs only the standard library.
"""

from __future__ import annotations

import mmap
import re
import struct
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MalformedWeights, ModelNotFound, UnsupportedArchitecture, WeightsMismatch
from .meta import interleaved_to_half
from .weights import SourceTensor, WeightSource

if TYPE_CHECKING:
    import numpy as np
    import torch

MAGIC = b"GGUF"
MAX_COUNT = 1 << 20            # tensors or metadata entries
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 26
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
# ggml type id -> (name, elements per block, bytes per block); the types Kiln dequantizes
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
# GGUF metadata value types: id -> struct format (scalars), 8 = string, 9 = array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]      # torch order (outermost first): reversed ggml ne[]
    ggml_type: int
    offset: int                 # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)
    data_start: int = 0


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> MalformedWeights:
        return MalformedWeights(f"{self.path.name}: {what} (at byte {self.pos})",
                                hint="the GGUF file is truncated or corrupt; download it again")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"needs {n} bytes but the file ends at {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(out)

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self, limit: int = MAX_STRING_BYTES) -> str:
        n = self.unpack("Q")
        if n > limit:
            raise self.fail(f"string of {n} bytes exceeds the {limit}-byte limit")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail("string is not valid UTF-8") from exc

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            if depth > 1:
                raise self.fail("arrays nested deeper than two levels")
            etype, count = self.unpack("I"), self.unpack("Q")
            if count > len(self.buf) - self.pos:  # every element takes at least one byte
                raise self.fail(f"array of {count} elements cannot fit in the file")
            if etype in SCALARS:  # bulk-decode scalar arrays
                fmt = SCALARS[etype]
                return list(struct.unpack(f"<{count}{fmt}", self.take(count * struct.calcsize(fmt))))
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise self.fail(f"unknown metadata value type {vtype}")


def read_header(path: Path) -> GGUFHeader:
    """Parse and validate a GGUF header and tensor table (reads no tensor data)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size < 24:
        raise MalformedWeights(f"{path.name}: {size} bytes is too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf, path)
        if r.take(4) != MAGIC:
            raise MalformedWeights(f"{path.name} is not a GGUF file (bad magic)")
        version = r.unpack("I")
        if version not in (2, 3):
            raise MalformedWeights(f"{path.name}: GGUF version {version} is not supported (2 or 3; big-endian "
                                   "files are not supported)")
        n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
        if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
            raise r.fail(f"{n_tensors} tensors / {n_kv} metadata entries exceed the {MAX_COUNT} limit")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string(MAX_KEY_BYTES)
            if key in meta:
                raise r.fail(f"metadata key {key!r} appears twice")
            meta[key] = r.value(r.unpack("I"))
        raw_tensors = []
        for _ in range(n_tensors):
            name = r.string(MAX_KEY_BYTES)
            n_dims = r.unpack("I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise r.fail(f"tensor {name!r} has {n_dims} dimensions")
            ne = [r.unpack("Q") for _ in range(n_dims)]
            raw_tensors.append((name, ne, r.unpack("I"), r.unpack("Q")))
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
            raise r.fail(f"general.alignment {align!r} is not a power of two")
        data_start = -(-r.pos // align) * align
    header = GGUFHeader(version, meta, data_start=data_start)
    spans = []
    for name, ne, gtype, rel in raw_tensors:
        if name in header.tensors:
            raise MalformedWeights(f"{path.name}: tensor {name!r} appears twice")
        if gtype not in GGML_TYPES:
            raise UnsupportedArchitecture(f"{path.name}: tensor {name!r} has ggml type {gtype}, which Kiln does not "
                                          "dequantize", hint="supported: " + ", ".join(t[0] for t in GGML_TYPES.values()))
        tname, block, bsize = GGML_TYPES[gtype]
        if any(d < 1 or d > 1 << 40 for d in ne):
            raise MalformedWeights(f"{path.name}: tensor {name!r} has dimensions {ne}")
        if ne[0] % block:
            raise MalformedWeights(f"{path.name}: tensor {name!r} ({tname}) row of {ne[0]} elements is not a "
                                   f"multiple of its block size {block}")
        n = 1
        for d in ne:
            n *= d
        if n > 1 << 40:
            raise MalformedWeights(f"{path.name}: tensor {name!r} has {n} elements")
        nbytes = n // block * bsize
        if rel % align:
            raise MalformedWeights(f"{path.name}: tensor {name!r} offset {rel} is not aligned to {align}")
        start = data_start + rel
        if start + nbytes > size:
            raise MalformedWeights(f"{path.name}: tensor {name!r} spans bytes {start}..{start + nbytes} but the file "
                                   f"has {size}", hint="the GGUF file is truncated; download it again")
        header.tensors[name] = GGUFTensorInfo(name, tuple(reversed(ne)), gtype, start, nbytes)
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (_, a1, an), (b0, _, bn) in zip(spans, spans[1:], strict=False):
        if b0 < a1:
            raise MalformedWeights(f"{path.name}: tensors {an!r} and {bn!r} overlap")
    return header


# -- architectures: GGUF metadata -> HF config, GGUF tensor names -> HF names ------------------------
@dataclass(frozen=True)
class GGUFArch:
    hf_architecture: str
    model_type: str
    permute_qk: bool = False        # llama.cpp's Llama converter stores q/k in interleaved rotary order
    norm_offset: bool = False       # Gemma: llama.cpp stores 1 + w for every RMSNorm weight
    sandwich_norms: bool = False    # Gemma 2/3: pre/post attention and feed-forward norms
    fused: bool = False             # Phi-3: qkv_proj and gate_up_proj
    extra_config: tuple[tuple[str, str], ...] = ()


COMMON_CONFIG = (
    ("context_length", "max_position_embeddings"), ("block_count", "num_hidden_layers"),
    ("feed_forward_length", "intermediate_size"), ("embedding_length", "hidden_size"),
    ("attention.head_count", "num_attention_heads"), ("attention.head_count_kv", "num_key_value_heads"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"), ("rope.freq_base", "rope_theta"),
    ("attention.key_length", "head_dim"), ("vocab_size", "vocab_size"),
)
GEMMA_CONFIG = (("attention.sliding_window", "sliding_window"),
                ("attn_logit_softcapping", "attn_logit_softcapping"),
                ("final_logit_softcapping", "final_logit_softcapping"))
ARCHS = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", permute_qk=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2"),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3"),
    "gemma2": GGUFArch("Gemma2ForCausalLM", "gemma2", norm_offset=True, sandwich_norms=True, extra_config=GEMMA_CONFIG),
    "gemma3": GGUFArch("Gemma3ForCausalLM", "gemma3_text", norm_offset=True, sandwich_norms=True,
                       extra_config=GEMMA_CONFIG),
    "phi3": GGUFArch("Phi3ForCausalLM", "phi3", fused=True),
}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
SANDWICH_NAMES = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                  "post_ffw_norm": "post_feedforward_layernorm"}
FUSED_NAMES = {"ffn_up": "mlp.gate_up_proj"}  # Phi-3's ffn_up holds [gate; up]
IGNORED_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}  # read into the config (rope scaling)
LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_tensor_name(arch: GGUFArch, name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = LAYER_RE.match(name)
    if not m:
        return None
    layer, part, kind = m.groups()
    table = dict(LAYER_NAMES)
    if arch.sandwich_norms:
        table.update(SANDWICH_NAMES)
    if arch.fused:
        table.update(FUSED_NAMES)
    hf = table.get(part)
    return f"model.layers.{layer}.{hf}.{kind}" if hf else None


def _float32_repr(x: float) -> float:
    """GGUF stores float32 (1e-5 -> 9.99999974e-06): the shortest decimal with the same float32."""
    f32 = struct.unpack("<f", struct.pack("<f", x))[0]
    if f32 != x:
        return x
    for digits in range(1, 10):
        short = float(f"{x:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", short))[0] == f32:
            return short
    return x


def hf_config_from_gguf(header: GGUFHeader, path: Path) -> tuple[dict, GGUFArch]:
    meta = header.metadata
    name = meta.get("general.architecture")
    if name not in ARCHS:
        raise UnsupportedArchitecture(f"{path.name}: GGUF architecture {name!r} is not supported",
                                      hint="supported GGUF architectures: " + ", ".join(sorted(ARCHS)))
    arch = ARCHS[name]
    hf: dict[str, Any] = {"architectures": [arch.hf_architecture], "model_type": arch.model_type}
    for key, hf_key in COMMON_CONFIG + arch.extra_config:
        value = meta.get(f"{name}.{key}")
        if value is None:
            continue
        if isinstance(value, list):
            raise UnsupportedArchitecture(f"{path.name}: {name}.{key} varies per layer ({value[:4]}...); "
                                          "per-layer shapes are not supported")
        hf[hf_key] = _float32_repr(value) if isinstance(value, float) else value
    for required in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(hf.get(required), int) or hf[required] < 1:
            raise MalformedWeights(f"{path.name}: metadata lacks a positive {name}.{_gguf_key(required)}")
    if "head_dim" not in hf and name == "llama" and isinstance(meta.get("llama.rope.dimension_count"), int):
        hf["head_dim"] = meta["llama.rope.dimension_count"]
    embed = header.tensors.get("token_embd.weight")
    if embed is None:
        raise WeightsMismatch(f"{path.name}: no token_embd.weight tensor")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = hf.get("vocab_size") or (len(tokens) if isinstance(tokens, list) else embed.shape[0])
    if vocab != embed.shape[0]:
        raise WeightsMismatch(f"{path.name}: vocabulary of {vocab} tokens but token_embd.weight has {embed.shape[0]} rows")
    hf["vocab_size"] = vocab
    hf["tie_word_embeddings"] = "output.weight" not in header.tensors
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        if isinstance(meta.get(f"tokenizer.ggml.{key}"), int):
            hf[hf_key] = meta[f"tokenizer.ggml.{key}"]
    kind = meta.get(f"{name}.rope.scaling.type")
    if kind == "linear" and isinstance(meta.get(f"{name}.rope.scaling.factor"), (int, float)):
        hf["rope_scaling"] = {"rope_type": "linear", "factor": _float32_repr(float(meta[f"{name}.rope.scaling.factor"]))}
    elif kind not in (None, "none"):
        raise UnsupportedArchitecture(f"{path.name}: rope scaling {kind!r} in GGUF is not supported",
                                      hint="convert the Hugging Face folder instead")
    if "rope_freqs.weight" in header.tensors and name == "llama":
        hf["rope_scaling"] = _llama3_rope(path, header.tensors["rope_freqs.weight"], hf)
    elif name == "phi3" and any(f"rope_factors_{k}.weight" in header.tensors for k in ("long", "short")):
        hf["rope_scaling"] = _phi3_longrope(path, header, meta, hf)
        hf["original_max_position_embeddings"] = hf["rope_scaling"].pop("original_max_position_embeddings")
    elif any(t in header.tensors for t in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")):
        raise UnsupportedArchitecture(f"{path.name}: per-dimension rope frequency factors (Phi-3 long context rope "
                                      "scaling) in GGUF are not supported", hint="convert the Hugging Face folder instead")
    if name == "qwen2":
        hf.setdefault("use_sliding_window", False)
    hf["torch_dtype"] = _auto_dtype(header)
    return hf, arch


# llama.cpp writes Llama 3.x's rope scaling as per-dimension factors; these are the parameter sets
# Meta released (3.1 / 3.3: factor 8, 3.2: factor 32), tried in turn against the stored factors.
LLAMA3_CANDIDATES = [{"factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192} for f in (8.0, 32.0, 16.0, 4.0, 2.0)]


def llama3_rope_factors(theta: float, head_dim: int, p: dict) -> list[float]:
    """Per-frequency divisors of Llama 3's rope scaling (Meta's ``apply_scaling``; llama.cpp's ``rope_freqs``)."""
    import math

    old, low, high, factor = (p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"],
                              p["factor"])
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _llama3_rope(path: Path, info: GGUFTensorInfo, hf: dict) -> dict:
    """The llama3 rope_scaling whose factors are the file's ``rope_freqs`` tensor, or a typed refusal."""
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    if info.type_name != "F32" or info.shape != (head_dim // 2,):
        raise MalformedWeights(f"{path.name}: rope_freqs.weight is {info.type_name} {list(info.shape)}, expected F32 "
                               f"[{head_dim // 2}]")
    with open(path, "rb") as f:
        f.seek(info.offset)
        stored = struct.unpack(f"<{head_dim // 2}f", f.read(info.nbytes))
    theta = float(hf.get("rope_theta", 10000.0))
    for cand in LLAMA3_CANDIDATES:
        want = llama3_rope_factors(theta, head_dim, cand)
        if all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(stored, want, strict=True)):
            return {"rope_type": "llama3", **cand}
    raise UnsupportedArchitecture(f"{path.name}: rope_freqs.weight matches none of Llama 3's rope scaling settings",
                                  hint="convert the Hugging Face folder instead")


def _read_f32(path: Path, info: GGUFTensorInfo, n: int, what: str) -> list[float]:
    """A small F32 vector tensor of the file (rope factors), checked: type, shape, finite values."""
    import math

    if info.type_name != "F32" or info.shape != (n,):
        raise MalformedWeights(f"{path.name}: {what} is {info.type_name} {list(info.shape)}, expected F32 [{n}]")
    with open(path, "rb") as f:
        f.seek(info.offset)
        values = struct.unpack(f"<{n}f", f.read(info.nbytes))
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise MalformedWeights(f"{path.name}: {what} holds a value that is not a positive finite number")
    return list(values)


def _phi3_longrope(path: Path, header: GGUFHeader, meta: dict, hf: dict) -> dict:
    """Phi-3's long-context rope as llama.cpp writes it (``convert_hf_to_gguf.py``, Phi3MiniModel): the
    short and long per-dimension factors as the tensors ``rope_factors_short`` / ``rope_factors_long``
    (F32, rotary dim / 2), ``phi3.rope.scaling.original_context_length`` and the attention factor
    ``phi3.rope.scaling.attn_factor`` (llama.cpp derives it as transformers does; the converter checks it).
    Back to HF's ``rope_scaling: {rope_type: longrope, short_factor, long_factor}``."""
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    rot = meta.get("phi3.rope.dimension_count", head_dim)
    if not isinstance(rot, int) or not 2 <= rot <= head_dim or rot % 2:
        raise MalformedWeights(f"{path.name}: phi3.rope.dimension_count {rot!r} for head size {head_dim}")
    original = meta.get("phi3.rope.scaling.original_context_length")
    if not isinstance(original, int) or original < 1:
        raise MalformedWeights(f"{path.name}: rope factors without a positive phi3.rope.scaling.original_context_length")
    out: dict = {"rope_type": "longrope", "original_max_position_embeddings": original}
    for kind in ("short", "long"):
        info = header.tensors.get(f"rope_factors_{kind}.weight")
        if info is None:
            raise MalformedWeights(f"{path.name}: rope_factors_{kind}.weight is missing beside its pair")
        out[f"{kind}_factor"] = [_float32_repr(v) for v in _read_f32(path, info, rot // 2, f"rope_factors_{kind}.weight")]
    attn = meta.get("phi3.rope.scaling.attn_factor")
    if isinstance(attn, float):
        from ..models.phi3 import attention_factor

        derived = attention_factor(int(hf.get("max_position_embeddings") or original), original)
        if abs(attn - derived) > 1e-6 * max(1.0, derived):  # a float32 of the derived value is not a choice
            out["attention_factor"] = _float32_repr(attn)
    if rot != head_dim:
        hf["partial_rotary_factor"] = rot / head_dim
    return out


def _gguf_key(hf_key: str) -> str:
    return next(k for k, v in COMMON_CONFIG if v == hf_key)


def _auto_dtype(header: GGUFHeader) -> str:
    """``--dtype auto``: the float type of the 2-D weights when they are all unquantized, else float16."""
    kinds = {t.type_name for t in header.tensors.values() if len(t.shape) == 2}
    return {"F32": "float32", "BF16": "bfloat16"}.get(kinds.pop(), "float16") if len(kinds) == 1 else "float16"


# -- the weight source ---------------------------------------------------------------------------
class GGUFSource(WeightSource):
    """HF-named tensors of one GGUF file, dequantized on demand (two most recent tensors cached)."""

    CACHE = 2

    def __init__(self, path: Path, header: GGUFHeader, hf: dict, arch: GGUFArch):
        self.path, self.header, self.hf, self.arch = path, header, hf, arch
        self._names: dict[str, GGUFTensorInfo] = {}
        unknown = []
        for name, info in header.tensors.items():
            hf_name = hf_tensor_name(arch, name)
            if hf_name is None:
                if name not in IGNORED_TENSORS:
                    unknown.append(name)
                continue
            self._names[hf_name] = info
        if unknown:
            raise UnsupportedArchitecture(f"{path.name}: tensors with no {arch.hf_architecture} counterpart: {unknown[:5]}")
        self._file = open(path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def open(cls, path: Path) -> GGUFSource:
        path = Path(path)
        header = read_header(path)
        hf, arch = hf_config_from_gguf(header, path)
        return cls(path, header, hf, arch)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def _transformed(self, name: str) -> bool:
        return self.arch.norm_offset and name.endswith("norm.weight")

    def info(self, name: str) -> SourceTensor:
        import torch

        t = self._names[name]
        native = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(t.type_name)
        return SourceTensor(name, torch.float32 if native is None or self._transformed(name) else native, t.shape)

    def gguf_array(self, name: str) -> np.ndarray:
        """The stored elements of HF tensor ``name``, dequantized (float32 for quantized types)."""
        import numpy as np

        t = self._names[name]
        raw = np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        if t.type_name == "F32":
            return raw.view(np.float32).reshape(t.shape)
        if t.type_name == "F16":
            return raw.view(np.float16).reshape(t.shape)
        if t.type_name == "BF16":
            return raw.view(np.uint16).reshape(t.shape)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        _, block, bsize = GGML_TYPES[t.ggml_type]
        rows = raw.reshape(*t.shape[:-1], t.shape[-1] // block * bsize)
        return dequantize(rows, GGMLQuantizationType(t.ggml_type)).reshape(t.shape)

    def view(self, name: str) -> torch.Tensor:
        import torch

        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        arr = self.gguf_array(name)
        t = self._names[name]
        with warnings.catch_warnings():  # pass-through tensors are read-only views of the map; nothing writes them
            warnings.simplefilter("ignore", UserWarning)
            out = torch.from_numpy(arr)
        if t.type_name == "BF16":
            out = out.view(torch.bfloat16)
        if self.arch.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = self.hf["num_attention_heads"] if ".q_proj." in name else \
                self.hf.get("num_key_value_heads") or self.hf["num_attention_heads"]
            out = interleaved_to_half(out, int(heads))  # reverse llama.cpp's permute
        if self._transformed(name):
            out = out.float() - 1.0  # Gemma's norms are stored as 1 + w
        with self._lock:
            self._cache[name] = out
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
        return out

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        """The file's tokenizer as HF tokenizer files in ``out_dir`` (transformers' GGUF tokenizer converter)."""
        if not _has_tokenizer_fields(self.header.metadata):
            return []  # a file without a tokenizer: engines take --tokenizer DIR
        return write_hf_tokenizer(self.path, out_dir)

    def close(self) -> None:
        self._cache.clear()
        try:
            self._map.close()
        except BufferError:  # numpy views still alive: the map closes when they go
            pass
        self._file.close()


def _has_tokenizer_fields(meta: dict) -> bool:
    return "tokenizer.ggml.model" in meta and "tokenizer.ggml.tokens" in meta


def has_tokenizer(path: Path) -> bool:
    """The GGUF file (header validated) carries a tokenizer transformers can rebuild."""
    return _has_tokenizer_fields(read_header(path).metadata)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def write_hf_tokenizer(path: Path, out_dir: Path) -> list[str]:
    """Write the GGUF's tokenizer as HF files into ``out_dir``; [] when it has none or transformers is absent."""
    import shutil
    import tempfile

    try:
        from transformers import AutoTokenizer
    except ImportError:
        warnings.warn("transformers is not installed: the GGUF tokenizer is not written", stacklevel=2)
        return []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-") as tmp:
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            tok.save_pretrained(tmp)
        except Exception as exc:  # an unusual tokenizer is not worth failing the conversion for
            warnings.warn(f"{path.name}: tokenizer not converted ({type(exc).__name__}: {exc})", stacklevel=2)
            return []
        written = []
        for name in TOKENIZER_FILES:
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, out_dir / name)
                written.append(name)
    return written


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


__all__ = ["ARCHS", "GGUFSource", "has_tokenizer", "hf_config_from_gguf", "hf_tensor_name", "is_gguf_file", "read_header",
           "write_hf_tokenizer"]

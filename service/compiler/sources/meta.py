"""Meta's consolidated Llama checkpoints (``params.json`` + ``consolidated.NN.pth``) as a weight source.

The layout TensorRT-LLM's ``LLaMAForCausalLM.from_meta_ckpt`` reads (``models/llama/convert.py``
``load_weights_from_meta_ckpt``, ``LLaMAConfig.from_meta_ckpt``): one pickle-in-zip file per
model-parallel rank of Meta's own training code. This module serves those tensors under Hugging
Face Llama names and layout, so the ordinary Llama converter re-splits them to any tp/pp:

- every shard must be a zip-format torch archive (checked before loading) and is read only with
  ``torch.load(weights_only=True, mmap=True)``; nothing else is ever unpickled;
- Meta's shards split column-parallel weights (``wq wk wv w1 w3 output``) along dim 0 and
  row-parallel ones (``wo w2``) along dim 1; norms are replicated; ``tok_embeddings`` is split along
  dim 1 by Llama 1/2 (``ParallelEmbedding``) and dim 0 by Llama 3 (``VocabParallelEmbedding``): the
  shard shapes say which;
- ``wq``/``wk`` rows are in the interleaved rotary order of Meta's ``apply_rotary_emb``; they are
  permuted to the half-split (GPT-NeoX) order HF uses, as ``convert_llama_weights_to_hf`` does.

    python -m service.cli convert ./Llama-3.1-8B-meta ./ckpt --tp-size 2   # folder with params.json
"""

from __future__ import annotations

import re
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidArgument, ModelNotFound, UnsafeWeights, UnsupportedArchitecture, WeightsMismatch
from .weights import SourceTensor, WeightSource, _inside, read_json

if TYPE_CHECKING:
    import torch

SHARD_RE = re.compile(r"^consolidated\.(\d{2,3})\.pth$")
MAX_SHARDS = 256
# Meta name (after "layers.N.") -> (HF name after "model.layers.N.", concat dim of Meta's shards or None)
LAYER_TABLE = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),  # silu branch
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
GLOBAL_TABLE = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "embedding"),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
IGNORED = {"rope.freqs"}  # Llama 1/2 store the rotary frequencies; they follow from rope_theta
# Meta's llama3 rope scaling (llama-models ``apply_scaling``) defaults
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DTYPE_NAMES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def is_meta_folder(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file() and any(path.glob("consolidated.*.pth"))


def interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from Meta's interleaved rotary pairs (x0,y0,x1,y1..) to HF's halves (x..,y..)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def intermediate_size(params: dict) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    if "hidden_dim" in params:
        return _int(params, "hidden_dim")
    dim = _int(params, "dim")
    hidden = int(2 * (4 * dim) / 3)
    mult = params.get("ffn_dim_multiplier")
    if mult is not None:
        if not isinstance(mult, (int, float)) or mult <= 0:
            raise InvalidArgument(f"params.json: ffn_dim_multiplier must be a positive number, got {mult!r}")
        hidden = int(mult * hidden)
    multiple_of = params.get("multiple_of", 1)
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise InvalidArgument(f"params.json: multiple_of must be a positive integer, got {multiple_of!r}")
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _int(params: dict, key: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"params.json: {key} must be a positive integer, got {value!r}")
    return value


def _check_zip(path: Path) -> None:
    """torch.save's format since 1.6 is a zip archive; anything else (a bare pickle) is refused unread."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" or not zipfile.is_zipfile(path):
        raise UnsafeWeights(f"{path.name} is not a zip-format torch archive (a bare pickle can run code); refused",
                            hint="re-save the shard with torch.save (zip format), or use a safetensors export")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise UnsafeWeights(f"{path.name} is a zip archive without torch's data.pkl; not a torch checkpoint")


class MetaConsolidatedSource(WeightSource):
    """Tensors of all shards, merged on demand (one merged tensor cached at a time), under HF names."""

    def __init__(self, folder: Path, params: dict, shards: list[dict[str, torch.Tensor]]):
        self.folder = folder
        self.params = params
        self.shards = shards
        self.n_heads = _int(params, "n_heads")
        self.n_kv_heads = _int(params, "n_kv_heads", self.n_heads)
        self.dim = _int(params, "dim")
        self.n_layers = _int(params, "n_layers")
        self._where: dict[str, tuple[str, int | str | None, int | None]] = {}  # hf -> (meta, dim, permute heads)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()
        self._cached: tuple[str, torch.Tensor] | None = None
        self._index()

    @classmethod
    def open(cls, folder: Path) -> MetaConsolidatedSource:
        import torch

        folder = Path(folder)
        params = read_json(folder / "params.json", "params.json")
        found = sorted(p.name for p in folder.glob("consolidated.*.pth"))
        if not found:
            raise ModelNotFound(f"no consolidated.*.pth shards in {folder}")
        bad = [n for n in found if not SHARD_RE.match(n)]
        if bad:
            raise WeightsMismatch(f"unexpected shard names {bad[:3]} (expected consolidated.00.pth, ...)")
        if len(found) > MAX_SHARDS:
            raise WeightsMismatch(f"{len(found)} shards; at most {MAX_SHARDS} are supported")
        indices = [int(SHARD_RE.match(n).group(1)) for n in found]  # type: ignore[union-attr]
        if sorted(indices) != list(range(len(found))):
            raise WeightsMismatch(f"shards {found} are not numbered 0..{len(found) - 1} without gaps",
                                  hint="download every consolidated.NN.pth of the model")
        paths = [_inside(folder, n) for n in sorted(found, key=lambda n: int(SHARD_RE.match(n).group(1)))]  # type: ignore[union-attr]
        for p in paths:
            _check_zip(p)
        shards = []
        for p in paths:
            try:
                state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # the weights-only unpickler refuses any global outside its allow-list
                raise UnsafeWeights(f"{p.name}: refused by the weights-only loader ({exc})") from exc
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items()):
                raise UnsafeWeights(f"{p.name}: does not hold a flat dict of tensors")
            shards.append(state)
        return cls(folder, params, shards)

    # -- indexing: names, merged shapes, checks ---------------------------------------------------
    def _index(self) -> None:
        keys = set(self.shards[0])
        for i, s in enumerate(self.shards[1:], 1):
            if set(s) != keys:
                diff = sorted(keys ^ set(s))[:3]
                raise WeightsMismatch(f"consolidated.{i:02d}.pth holds other tensors than consolidated.00.pth ({diff})")
        layer_re = re.compile(r"^layers\.(\d+)\.(.+)$")
        unexpected = []
        for key in sorted(keys):
            m = layer_re.match(key)
            if m and m.group(2) in LAYER_TABLE and int(m.group(1)) < self.n_layers:
                hf, dim = LAYER_TABLE[m.group(2)]
                hf_name: str = f"model.layers.{m.group(1)}.{hf}"
                heads = (self.n_heads if m.group(2) == "attention.wq.weight" else
                         self.n_kv_heads if m.group(2) == "attention.wk.weight" else None)
                self._add(hf_name, key, dim, heads)
            elif key in GLOBAL_TABLE:
                hf_name, gdim = GLOBAL_TABLE[key]
                self._add(hf_name, key, gdim, None)
            elif key not in IGNORED:
                unexpected.append(key)
        if unexpected:
            raise UnsupportedArchitecture(
                f"Meta checkpoint has tensors the Llama layout does not know: {unexpected[:5]}",
                hint="only dense Llama checkpoints (no MoE, no vision) are supported")

    def _add(self, hf: str, meta: str, dim: int | str | None, heads: int | None) -> None:
        shapes = [tuple(s[meta].shape) for s in self.shards]
        n = len(shapes)
        if any(sh != shapes[0] for sh in shapes):
            raise WeightsMismatch(f"{meta}: shards disagree on its shape ({sorted(set(shapes))[:3]})")
        shape = shapes[0]
        if dim == "embedding":  # Llama 1/2 split the embedding width, Llama 3 the vocabulary
            if n == 1:
                dim = 0
            else:
                by_vocab = len(shape) == 2 and shape[1] == self.dim
                by_width = len(shape) == 2 and shape[1] * n == self.dim
                if by_vocab == by_width:
                    raise WeightsMismatch(f"{meta}: shard shape {list(shape)} does not tell how {n} shards split "
                                          f"an embedding of width dim={self.dim}")
                dim = 0 if by_vocab else 1
        if dim is None or n == 1:
            merged = shape
            dim = None
        else:
            assert isinstance(dim, int)
            if len(shape) <= dim:
                raise WeightsMismatch(f"{meta}: shape {list(shape)} has no dim {dim} to merge shards along")
            merged = tuple(s * n if i == dim else s for i, s in enumerate(shape))
        self._where[hf] = (meta, dim, heads)
        self._shapes[hf] = merged

    def hf_config(self) -> dict:
        """An HF LlamaConfig dict equivalent of params.json, checked against the merged weight shapes."""
        p = self.params
        embed = self._shapes.get("model.embed_tokens.weight")
        if embed is None:
            raise WeightsMismatch("Meta checkpoint has no tok_embeddings.weight")
        vocab = p.get("vocab_size", -1)
        if vocab in (-1, None):  # Llama 2's params.json says -1: the tokenizer decides, so do the weights
            vocab = embed[0]
        if not isinstance(vocab, int) or vocab < 1 or vocab != embed[0]:
            raise WeightsMismatch(f"params.json vocab_size={vocab!r} but tok_embeddings has {embed[0]} rows")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise InvalidArgument(f"params.json: dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} "
                                  "do not split into whole heads")
        eps = p.get("norm_eps", 1e-5)
        theta = p.get("rope_theta", 10000.0)
        for key, value in (("norm_eps", eps), ("rope_theta", theta)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument(f"params.json: {key} must be a positive number, got {value!r}")
        hf: dict = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": intermediate_size(p),
            "vocab_size": vocab,
            "rms_norm_eps": float(eps),
            "rope_theta": float(theta),
            "hidden_act": "silu",
            "tie_word_embeddings": "lm_head.weight" not in self._shapes,
            "torch_dtype": DTYPE_NAMES.get(str(next(iter(self.shards[0].values())).dtype), "bfloat16"),
        }
        max_pos = p.get("max_seq_len") or p.get("max_position_embeddings")
        if p.get("use_scaled_rope"):
            rope = dict(LLAMA3_ROPE)
            for meta_key, key in (("rope_scaling_factor", "factor"), ("rope_high_freq_factor", "high_freq_factor")):
                if isinstance(p.get(meta_key), (int, float)):
                    rope[key] = float(p[meta_key])
            hf["rope_scaling"] = {"rope_type": "llama3", **rope}
            max_pos = max_pos or int(rope["factor"] * rope["original_max_position_embeddings"])
        hf["max_position_embeddings"] = int(max_pos or 2048)  # TensorRT-LLM's from_meta_ckpt default
        self._check_shapes(hf)
        return hf

    def _check_shapes(self, hf: dict) -> None:
        H, nh, nkv, inter = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["intermediate_size"]
        d = H // nh
        want = {"self_attn.q_proj.weight": (nh * d, H), "self_attn.k_proj.weight": (nkv * d, H),
                "self_attn.v_proj.weight": (nkv * d, H), "self_attn.o_proj.weight": (H, nh * d),
                "mlp.gate_proj.weight": (inter, H), "mlp.up_proj.weight": (inter, H), "mlp.down_proj.weight": (H, inter),
                "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,)}
        for i in range(self.n_layers):
            for name, shape in want.items():
                full = f"model.layers.{i}.{name}"
                if full not in self._shapes:
                    raise WeightsMismatch(f"Meta checkpoint lacks layers.{i} tensor for {name}")
                if self._shapes[full] != shape:
                    raise WeightsMismatch(f"{self._where[full][0]}: "
                                          f"shards merge to {list(self._shapes[full])}, params.json implies {list(shape)}")
        if self._shapes.get("model.norm.weight") != (H,):
            raise WeightsMismatch("Meta checkpoint lacks norm.weight of width dim")

    # -- WeightSource ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> SourceTensor:
        meta = self._where[name][0]
        return SourceTensor(name, self.shards[0][meta].dtype, self._shapes[name])

    def view(self, name: str) -> torch.Tensor:
        import torch

        with self._lock:
            if self._cached is not None and self._cached[0] == name:
                return self._cached[1]
            meta, dim, heads = self._where[name]
            parts = [s[meta] for s in self.shards]
            t = parts[0] if dim is None else torch.cat(parts, dim=int(dim))
            if heads is not None:
                t = interleaved_to_half(t, heads)
            self._cached = (name, t)
            return t

    def close(self) -> None:
        self._cached = None
        self.shards = []


__all__ = ["MetaConsolidatedSource", "interleaved_to_half", "intermediate_size", "is_meta_folder"]
